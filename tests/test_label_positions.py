"""The output head computed only where the loss is taken (models/label_positions.py): the
same loss and the same LoRA gradients as from every logit, on four architectures; models
that do not honour it are detected and trained the usual way."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from test_packing import ARCHS, examples

from qlora_pipeline.data.tokenize import pack
from qlora_pipeline.models import label_positions
from qlora_pipeline.training import packing


def lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules="all-linear", init_lora_weights=False)  # B != 0
    return get_peft_model(model, config)


def loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_keep_takes_positions_that_predict_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100],
                           [-100, -100, -100, -100, 7]])
    batch = label_positions.keep({"input_ids": torch.zeros(2, 5, dtype=torch.long),
                                  "labels": labels})
    # position p predicts token p + 1: row 0 needs 1 and 2, row 1 needs 3
    assert batch["logits_to_keep"].tolist() == [1, 2, 3]
    assert batch["shift_labels"].tolist() == [[5, 6, -100], [-100, -100, 7]]


def test_keep_leaves_a_batch_without_labels_alone():
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long),
             "labels": torch.full((1, 3), -100)}
    assert label_positions.keep(batch) is batch


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_every_logit(tiny_tokenizer, arch, packed):
    model = lora(build_model(len(tiny_tokenizer), 0, arch))
    rows = examples([7, 12, 5, 9, 3], seed=1)
    if packed:
        model.config.use_cache = False
        rows = pack(rows, max_length=24)
    batch = packing.Collator(tiny_tokenizer)([dict(r) for r in rows])
    kept = packing.Collator(tiny_tokenizer, label_positions=True)([dict(r) for r in rows])
    assert kept["logits_to_keep"].numel() < batch["input_ids"].shape[1]

    full_loss, full_grads = loss_and_grads(model, batch)
    kept_loss, kept_grads = loss_and_grads(model, kept)
    assert kept_loss == pytest.approx(full_loss, abs=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    result = label_positions.check(model, batch)
    assert result["used"] and result["loss_gap"] <= 1e-6, result


def test_a_model_that_ignores_kept_positions_is_not_used(tiny_tokenizer):
    model = lora(build_model(len(tiny_tokenizer), 0, "llama"))
    base = model.get_base_model()
    forward = base.forward

    def every_logit(*args, logits_to_keep=0, **kwargs):  # takes the argument, drops it
        return forward(*args, **kwargs)

    base.forward = every_logit
    batch = packing.Collator(tiny_tokenizer)(examples([7, 12, 5]))
    result = label_positions.check(model, batch)
    assert not result["used"]
    assert "failed on kept positions" in result["reason"] or "positions' logits" in result["reason"]


def test_a_model_without_the_argument_is_not_used(tiny_tokenizer):
    class Plain(torch.nn.Module):  # a causal LM with a forward of its own
        def __init__(self):
            super().__init__()
            self.inner = build_model(len(tiny_tokenizer), 0, "llama")

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    batch = packing.Collator(tiny_tokenizer)(examples([7, 12]))
    result = label_positions.check(Plain(), batch)
    assert result == {"used": False, "reason": "Plain.forward takes no logits_to_keep"}


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_from_kept_positions_equals_every_position(tiny_tokenizer, arch, monkeypatch):
    from qlora_pipeline.models import perplexity

    model = build_model(len(tiny_tokenizer), 0, arch)
    rows = examples([7, 12, 5, 9], seed=2)
    kept = perplexity.perplexity(model, rows, max_examples=4)
    monkeypatch.setattr(perplexity, "supported", lambda model: False)
    full = perplexity.perplexity(model, rows, max_examples=4)
    assert kept["tokens"] == full["tokens"] == sum(len(r["input_ids"]) - len(r["input_ids"]) // 2
                                                   for r in rows)
    assert kept["nll"] == pytest.approx(full["nll"], abs=1e-6)
