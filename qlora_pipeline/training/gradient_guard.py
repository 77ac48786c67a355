"""Training fails, naming the layers, when an adapter gets no gradient.

A cut gradient path does not crash anything: the loss is finite, the optimizer steps, and
the adapter silently stays where it started (bitsandbytes' packed CPU kernel did exactly
this after every evaluation; see models/numerics.py). So the invariant is checked where it
must hold, before the optimizer step:

- every lora_B has a non-zero gradient (B = 0 at the start, but its gradient is x·A ≠ 0);
- every lora_A whose B is non-zero has one too (A's gradient is Bᵀ·g, zero only while B is);

on the first two optimizer steps of a run (or of a resumed run) and on the first step after
every evaluation. A logged gradient norm of 0 fails as well.

AdaLoRA (ΔW = B·diag(E)·A) has its own rule: E starts at zero, so A and B get no gradient from
the loss at first, and a pruned triplet (E_i masked to zero) never does. So every kept E_i
needs a gradient (it is b_iᵀ·g·a_i), and the row of A and column of B of every kept triplet
whose E_i is non-zero need one too.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from . import adalora

log = logging.getLogger(__name__)
SHOWN = 5  # layer names in the message; the count is always given


class GradientPathBroken(RuntimeError):
    """Some adapter weights get no gradient: training would not change them."""


def adapter_pairs(model) -> list[tuple[str, str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(A's name, B's name, A, B) for every trainable LoRA pair of the model (AdaLoRA's
    triplets: adalora_missing)."""
    params = dict(model.named_parameters())
    return [(name, b_name, a, params[b_name]) for name, a in params.items()
            if ".lora_A." in name and a.requires_grad
            and (b_name := name.replace(".lora_A.", ".lora_B.")) in params
            and name.replace(".lora_A.", ".lora_E.") not in params]


def _has_gradient(param) -> bool:
    return param.grad is not None and bool(torch.count_nonzero(param.grad))


def missing_gradients(model) -> list[str]:
    """The LoRA weights that should have a gradient now and have none."""
    missing = adalora_missing(model) if adalora.allocator(model) else []
    for a_name, b_name, a, b in adapter_pairs(model):
        if not _has_gradient(b):
            missing.append(b_name)
        if bool(torch.count_nonzero(b)) and not _has_gradient(a):
            missing.append(a_name)
    return missing


def adalora_missing(model) -> list[str]:
    """AdaLoRA's rule (above): '<layer>.lora_E[i]' etc. for each kept triplet i lacking one."""
    params, missing = dict(model.named_parameters()), []
    masks = adalora.kept_masks(model)
    for name, e in params.items():
        if ".lora_E." not in name or not e.requires_grad:
            continue
        kept = masks[adalora.module_of(name)]
        a, b = (params[name.replace(".lora_E.", f".{part}.")] for part in ("lora_A", "lora_B"))
        live = kept & (e.detach().view(-1) != 0)
        for part, grad, wanted in (("lora_E", e.grad, kept), ("lora_A", a.grad, live),
                                   ("lora_B", b.grad, live)):
            per_triplet = _per_triplet(grad, len(kept), part == "lora_B")
            missing += [f"{name.replace('.lora_E.', f'.{part}.')}[{i}]"
                        for i in torch.nonzero(wanted & ~per_triplet).view(-1).tolist()]
    return missing


def _per_triplet(grad, rank: int, columns: bool) -> torch.Tensor:
    """Which triplets' slice of a factor (E's entry, A's row, B's column) has a gradient."""
    if grad is None:
        return torch.zeros(rank, dtype=torch.bool)
    return (grad.detach() != 0).any(dim=0 if columns else 1).cpu()


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
                f"{_weights(model)} LoRA weights got no gradient: "
                f"{', '.join(missing[:SHOWN])}{' …' if len(missing) > SHOWN else ''}. The base "
                f"model's layers do not pass gradients back (a non-differentiable kernel, or a "
                f"detached or frozen path); training would leave these adapters unchanged")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (logs or {}).get("grad_norm") == 0:
            raise GradientPathBroken(f"step {state.global_step}: gradient norm 0 — no gradient "
                                     f"reached the adapters; training would change nothing")


def _weights(model) -> int:
    """How many weights the guard checks: 2 per LoRA pair, 3 per AdaLoRA triplet."""
    triplets = sum(int(e.numel()) for n, e in model.named_parameters() if ".lora_E." in n)
    return 2 * len(adapter_pairs(model)) + 3 * triplets
