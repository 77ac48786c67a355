"""The ways several adapters combine (analysis/combine.py computes them), named once: torch-free,
so that the config can check a combination's method when the workflow is parsed."""

EXACT = ("cat", "sum")  # Σ wᵢΔWᵢ exactly
TRUNCATED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*EXACT, *TRUNCATED)
LOW_RANK = ("cat", "sum", "svd")  # computed from the factors; the others from dense updates
DENSITY = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# PEFT's methods that combine A and B apart (cross terms Bᵢ·Aⱼ, PEFT #3004), and the method
# here that does on the updates ΔWᵢ what each means.
FACTOR_WISE = {"linear": "sum", "ties": "ties_svd", "dare_linear": "dare_linear_svd",
               "dare_ties": "dare_ties_svd", "magnitude_prune": "magnitude_prune_svd"}
