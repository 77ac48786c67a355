"""Models: importing the base, 4-bit quantization and its quality measures."""
