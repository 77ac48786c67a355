"""Training: LoRA injection on the 4-bit base, the training loop, recovery and merging."""
