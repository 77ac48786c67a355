"""Analysis: what a trained LoRA adapter changed, from its saved tensors alone (no model)."""
