"""Training fails, naming the layers, when the adapters get no gradient (gradient_guard.py).

The cut is made the way bitsandbytes' packed CPU kernel made it: a 4-bit layer that has run
an eval pass without grad returns outputs from which no gradient reaches its input.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_inputs, stage, task_blocks
from qlora_pipeline.training import gradient_guard, loop


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> dict:
    quant, tokenized = build_inputs(tmp_path_factory.mktemp("guard"), tiny_model_dir)
    return {"quant": quant, "tokenized": tokenized}


def train(prepared, tmp_path, **train_overrides) -> dict:
    cfg = {**task_blocks()["train"], "max_steps": 12, "eval_steps": 4, "logging_steps": 1,
           "learning_rate": 5e-3, "batch_size": 8, **train_overrides}
    return stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                                adapter=tmp_path / "qlora", lora=task_blocks()["lora"], train=cfg,
                                seed=0, checkpoints=tmp_path / "checkpoints")


def cut_after_evaluation_at(monkeypatch, step: int) -> None:
    """From the evaluation at `step` on (0: the one before training), 4-bit layers stop
    passing gradients once they have run an eval pass. Armed only by the trainer: the
    loader's own numerics check (models/numerics.py) would catch a cut made earlier."""
    import bitsandbytes as bnb

    armed = {"now": False}
    forward = bnb.nn.Linear4bit.forward
    evaluate = loop.GuardedTrainer.evaluate

    def packed_like(self, x):
        if armed["now"] and not self.training and not torch.is_grad_enabled():
            self._cut = True
        out = forward(self, x)
        if not getattr(self, "_cut", False):
            return out
        # Like an op without an autograd kernel: its output takes part in backward, but
        # nothing reaches its inputs (so the loss still has a graph, and the step runs).
        return out.detach().requires_grad_(torch.is_grad_enabled())

    def arming_evaluate(self, *args, **kwargs):
        armed["now"] = self.state.global_step >= step
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", packed_like)
    monkeypatch.setattr(loop.GuardedTrainer, "evaluate", arming_evaluate)


def test_a_cut_from_the_start_fails_the_first_step_naming_the_layers(prepared, tmp_path,
                                                                     monkeypatch):
    cut_after_evaluation_at(monkeypatch, 0)
    with pytest.raises(gradient_guard.GradientPathBroken) as failure:
        train(prepared, tmp_path)
    message = str(failure.value)
    assert message.startswith("optimizer step 1 (at the start of training): 4 of 8 LoRA "
                              "weights got no gradient: "), message
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in message
    assert "lora_A" not in message  # B = 0 at step 1: A's gradient is zero by construction
    assert not (tmp_path / "qlora").exists()
    assert not list(tmp_path.glob(".qlora*"))


def test_a_cut_that_starts_at_a_later_evaluation_fails_the_step_after_it(prepared, tmp_path,
                                                                         monkeypatch):
    cut_after_evaluation_at(monkeypatch, 8)
    with pytest.raises(gradient_guard.GradientPathBroken,
                       match=r"^optimizer step 9 \(after an evaluation\): 8 of 8 LoRA weights"):
        train(prepared, tmp_path)
    assert not (tmp_path / "qlora").exists()


def test_an_uncut_run_passes_every_check(prepared, tmp_path, monkeypatch):
    checked = []
    missing = gradient_guard.missing_gradients

    def counting(model):
        checked.append(missing(model))
        return checked[-1]

    monkeypatch.setattr(gradient_guard, "missing_gradients", counting)
    summary = train(prepared, tmp_path)
    assert summary["steps"] == 12
    # Steps 1 and 2, then the first step after the evaluations at steps 4 and 8 (the one at
    # step 12 is the last): four checks, none missing anything.
    assert checked == [[], [], [], []]


def test_a_logged_gradient_norm_of_zero_fails():
    guard = gradient_guard.GradientGuard()
    state = type("State", (), {"global_step": 7})()
    guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": 0.31})
    with pytest.raises(gradient_guard.GradientPathBroken, match=r"^step 7: gradient norm 0"):
        guard.on_log(None, state, None, logs={"loss": 1.0, "grad_norm": 0.0})


def test_missing_gradients_follows_the_lora_invariant():
    """lora_B needs a gradient always; lora_A only where its B is non-zero."""
    layer = torch.nn.Module()
    layer.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
    layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})
    model = torch.nn.ModuleDict({"q_proj": layer})
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.nn.init.zeros_(b)
    a.grad, b.grad = torch.zeros_like(a), torch.ones_like(b)
    assert gradient_guard.missing_gradients(model) == []  # step 1: B = 0
    b.grad = None
    assert gradient_guard.missing_gradients(model) == ["q_proj.lora_B.default.weight"]
    torch.nn.init.ones_(b)
    b.grad = torch.ones_like(b)
    assert gradient_guard.missing_gradients(model) == ["q_proj.lora_A.default.weight"]
