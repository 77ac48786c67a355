"""AdaLoRA in the training loop (lora.type adalora; PEFT's AdaLoraModel and RankAllocator).

PEFT prunes the least important singular triplets (E_i with its row of A and column of B) by
masking E_i to zero, step by step down to the budget (target_r per adapted matrix), when
`update_and_allocate(step)` is called after the optimizer step and before the gradients are
zeroed: Trainer's on_optimizer_step, where PEFT's own AdamssAsaCallback calls its allocator.

Checkpoints keep every triplet (the pruned ones masked) and the allocator's running state
beside them: PEFT would save only the kept triplets and, on loading, cut the live layers to the
pattern, which neither the optimizer's state nor a resumed schedule can follow. The final
adapter is saved PEFT's way (kept triplets, rank_pattern in its config).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import TrainerCallback

from .distributed import is_main

STATE = "adalora_state.pt"  # in each checkpoint folder: the allocator's state and rank pattern


def allocator(model):
    """PEFT's RankAllocator of an AdaLoRA model being trained; None for any other model."""
    return getattr(getattr(model, "base_model", None), "rankallocator", None)


def _config(model):
    return model.peft_config[model.base_model.trainable_adapter_name]


def kept_masks(model) -> dict[str, torch.Tensor]:
    """{module path: which of its triplets are kept}: PEFT's rank pattern, all before pruning."""
    pattern = {module_of(key): mask for key, mask in (_config(model).rank_pattern or {}).items()}
    return {module: torch.tensor(pattern[module]) if module in pattern
            else torch.ones(e.shape[0], dtype=torch.bool)
            for module, e in _energies(model).items()}


def module_of(name: str) -> str:
    """'base_model.model.<path>.lora_E.default' or '<path>.lora_E[.default]' -> '<path>'."""
    return name.removeprefix("base_model.model.").split(".lora_E")[0]


def _energies(model) -> dict[str, torch.nn.Parameter]:
    return {module_of(name): p for name, p in model.named_parameters() if ".lora_E." in name}


def ranks(model) -> dict[str, int]:
    return {module: int(mask.sum()) for module, mask in kept_masks(model).items()}


def rank_pattern(model) -> dict:
    """rank_pattern.json: the budget (target_r × adapted matrices) and each layer's rank."""
    return {"budget": allocator(model).target_bgt, "ranks": ranks(model)}


class RankAllocation(TrainerCallback):
    """PEFT's update_and_allocate at every optimizer step (its global step counts from 0, as in
    PEFT's examples); the total kept rank in every log record."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None:  # before MetricsLog writes the record
            logs["effective_rank"] = sum(ranks(model).values())


@contextlib.contextmanager
def task_loss_only(model):
    """PEFT's AdaLoRA adds its orthogonality penalty on A and B to every loss the model returns,
    evaluation's too; without it, validation loss is the task's alone, comparable with LoRA's
    (and, before the first step, the base's: E = 0)."""
    if allocator(model) is None:
        yield
        return
    config = _config(model)
    weight, config.orth_reg_weight = config.orth_reg_weight, 0.0
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def _state(model) -> dict:
    ranks_ = allocator(model)
    return {"rank_pattern": _config(model).rank_pattern, "ipt": ranks_.ipt,
            "exp_avg_ipt": ranks_.exp_avg_ipt, "exp_avg_unc": ranks_.exp_avg_unc}


@contextlib.contextmanager
def whole_checkpoint(model, folder, saving: bool):
    """An AdaLoRA model saved to or loaded from a checkpoint folder with every triplet and the
    allocator's state (see above); for any other model, nothing changes."""
    if allocator(model) is None:
        yield
        return
    config, folder = _config(model), Path(folder)
    kept = config.rank_pattern
    if saving and is_main():  # before the manifest, the mark of a complete checkpoint
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_state(model), folder / STATE)
    config.rank_pattern = None  # PEFT cuts to the pattern only where there is one
    try:
        yield
    finally:
        config.rank_pattern = kept
    if not saving:
        state = torch.load(folder / STATE, weights_only=True)
        config.rank_pattern = state.pop("rank_pattern")
        for name, values in state.items():
            setattr(allocator(model), name, values)
