"""Models: importing the base, quantization (methods/) and its quality measures."""
