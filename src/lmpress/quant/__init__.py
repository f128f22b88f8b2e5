"""Quantization: affine primitives and packing (primitives.py), then the methods built on them."""
