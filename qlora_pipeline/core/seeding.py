"""The seed of everything a stage draws at random: Python's, NumPy's and torch's generators."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Only stages that load a model seed (quantize, quantization_sweep_point, train_qlora,
    recover, evaluate), and their environments all have torch: no fallback without it."""
    import numpy as np  # only the stages that seed need it; the import costs a data job ~0.1 s
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
