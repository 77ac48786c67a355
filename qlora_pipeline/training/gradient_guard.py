"""Training fails, naming the layers, when an adapter gets no gradient.

A cut gradient path does not crash anything: the loss is finite, the optimizer steps, and
the adapter silently stays where it started (bitsandbytes' packed CPU kernel did exactly
this after every evaluation; see models/numerics.py). So the invariant is checked where it
must hold, before the optimizer step:

- every lora_B has a non-zero gradient (B = 0 at the start, but its gradient is x·A ≠ 0);
- every lora_A whose B is non-zero has one too (A's gradient is Bᵀ·g, zero only while B is);

on the first two optimizer steps of a run (or of a resumed run) and on the first step after
every evaluation. A logged gradient norm of 0 fails as well.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)
SHOWN = 5  # layer names in the message; the count is always given


class GradientPathBroken(RuntimeError):
    """Some adapter weights get no gradient: training would not change them."""


def adapter_pairs(model) -> list[tuple[str, str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(A's name, B's name, A, B) for every trainable LoRA pair of the model."""
    params = dict(model.named_parameters())
    return [(name, b_name, a, params[b_name]) for name, a in params.items()
            if ".lora_A." in name and a.requires_grad
            and (b_name := name.replace(".lora_A.", ".lora_B.")) in params]


def _has_gradient(param) -> bool:
    return param.grad is not None and bool(torch.count_nonzero(param.grad))


def missing_gradients(model) -> list[str]:
    """The LoRA weights that should have a gradient now and have none."""
    missing = []
    for a_name, b_name, a, b in adapter_pairs(model):
        if not _has_gradient(b):
            missing.append(b_name)
        if bool(torch.count_nonzero(b)) and not _has_gradient(a):
            missing.append(a_name)
    return missing


class GradientGuard(TrainerCallback):
    """Checks gradient flow into the adapters at the steps where the bug class shows."""

    checks_left = 0  # optimizer steps still to check, and why
    reason = ""
    start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step
        self.checks_left, self.reason = 2, "at the start of training"

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == self.start_step:  # eval_on_start: before the first step
            return
        self.checks_left, self.reason = max(self.checks_left, 1), "after an evaluation"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.checks_left == 0:
            return
        self.checks_left -= 1
        if missing := missing_gradients(model):
            raise GradientPathBroken(
                f"optimizer step {state.global_step + 1} ({self.reason}): {len(missing)} of "
                f"{2 * len(adapter_pairs(model))} LoRA weights got no gradient: "
                f"{', '.join(missing[:SHOWN])}{' …' if len(missing) > SHOWN else ''}. The base "
                f"model's layers do not pass gradients back (a non-differentiable kernel, or a "
                f"detached or frozen path); training would leave these adapters unchanged")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (logs or {}).get("grad_norm") == 0:
            raise GradientPathBroken(f"step {state.global_step}: gradient norm 0 — no gradient "
                                     f"reached the adapters; training would change nothing")
