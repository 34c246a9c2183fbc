"""The lightweight, torch-free runtime: numpy, pillow, tokenizers and a backend library only."""
