"""ONNX export of the runtime stages (text_guide, vision, fusion, embed, decoder) and engine builds."""
