"""Calibration data (images + prompts) and quantisation."""
