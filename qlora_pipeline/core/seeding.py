"""The seed of everything a stage draws at random: Python's, NumPy's and torch's generators."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    import numpy as np  # only the stages that seed need it; the import costs a data job ~0.1 s

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
