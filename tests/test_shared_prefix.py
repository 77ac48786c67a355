"""Training batches whose rows share a beginning, computed once (training/shared_prefix.py):
the same loss and the same adapter gradients as the whole batch on four architectures, padded
rows and kept logits included; where it would not be exact it is not used."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from test_packing import ARCHS

from qlora_pipeline.training import packing, shared_prefix


def lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout,
                        target_modules="all-linear", init_lora_weights=False)  # B != 0
    return get_peft_model(model, config)


def rows(prefix: int = 9, lengths=(7, 12, 5), seed=0) -> list[dict]:
    """A common prompt start, then each row's own prompt tokens and a labelled answer."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 300, (prefix,), generator=generator).tolist()
    out = []
    for n in lengths:
        own = torch.randint(3, 300, (n,), generator=generator).tolist()
        ids = start + own
        labels = [-100] * (prefix + n // 2) + own[n // 2:]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.requires_grad}


@pytest.mark.parametrize("layout", shared_prefix.LAYOUTS)
@pytest.mark.parametrize("kept", [False, True], ids=["all-logits", "kept-logits"])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_the_whole_batch(tiny_tokenizer, arch, kept, layout):
    model = lora(build_model(len(tiny_tokenizer), 0, arch)).train()
    batch = packing.Collator(tiny_tokenizer, label_positions=kept)(rows())  # right-padded
    assert shared_prefix.prefix_length(batch) == 9
    split = shared_prefix.split(model, batch, (layout,))
    rows_, width = batch["input_ids"].shape
    expected = (1, 9 + rows_ * (width - 9)) if layout == shared_prefix.ONE_ROW else (rows_, width - 9)
    assert tuple(split["input_ids"].shape) == expected

    whole_loss, whole_grads = loss_and_grads(model, batch)
    split_loss, split_grads = loss_and_grads(model, split)
    assert split_loss == pytest.approx(whole_loss, abs=1e-6)
    assert split_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    result = shared_prefix.check(model, batch)
    assert result["used"] and result["layouts"] == list(shared_prefix.LAYOUTS), result
    assert result[f"{layout} grad_gap"] <= 1e-4, result


def test_one_row_only_while_its_attention_stays_small(tiny_tokenizer):
    """Many long rows with a short prefix: one row would cost ~rows times the attention."""
    model = lora(build_model(len(tiny_tokenizer), 0, "llama")).train()
    batch = packing.Collator(tiny_tokenizer)(rows(prefix=4, lengths=(60,) * 8))
    assert shared_prefix.split(model, batch)["input_ids"].shape == (8, 60)  # the cache
    short = packing.Collator(tiny_tokenizer)(rows())
    assert shared_prefix.split(model, short)["input_ids"].shape[0] == 1


def test_a_model_without_4d_masks_keeps_the_cache(tiny_tokenizer, monkeypatch):
    """An attention that ignores the mask (flash-attention takes none) fails the one-row
    check: the tokens of one row would see another's. The cache layout still serves."""
    model = lora(build_model(len(tiny_tokenizer), 0, "llama")).train()
    base = model.get_base_model()
    forward = type(base).forward

    def plain_mask(self, *args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return forward(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(type(base), "forward", plain_mask)
    result = shared_prefix.check(model, packing.Collator(tiny_tokenizer)(rows()))
    assert result["used"] and result["layouts"] == [shared_prefix.CACHE], result
    assert shared_prefix.ONE_ROW in result["refused"], result


def test_prefix_stops_before_the_first_label_is_predicted():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11, 1], [5, 6, 7, 8, 9, 10, 11, 2]]),
             "labels": torch.tensor([[-100] * 6 + [11, 1], [-100] * 6 + [11, 2]])}
    # identical up to column 7, but the token at 6 is labelled: position 5 predicts it
    assert shared_prefix.prefix_length(batch) == 5
    batch["labels"][:, 6] = -100
    assert shared_prefix.prefix_length(batch) == 6
    one_row = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix.prefix_length(one_row) == 0
    short = {k: v[:, 2:] for k, v in batch.items()}  # 4 common tokens: the minimum worth it
    assert shared_prefix.prefix_length(short) == 4
    short = {k: v[:, 3:] for k, v in batch.items()}
    assert shared_prefix.prefix_length(short) == 0


def test_packed_rows_are_left_whole(tiny_tokenizer):
    from qlora_pipeline.data.tokenize import pack

    packed = pack(rows() + rows(seed=1), max_length=64)
    batch = packing.Collator(tiny_tokenizer)(packed)
    assert "position_ids" in batch and shared_prefix.prefix_length(batch) == 0


@pytest.mark.parametrize("blocker", ["adapter dropout", "base dropout", "checkpointing"])
def test_not_used_where_rows_would_differ(tiny_tokenizer, blocker):
    base = build_model(len(tiny_tokenizer), 0, "phi" if blocker == "base dropout" else "llama")
    if blocker == "base dropout":
        base.config.attention_dropout = 0.1
    model = lora(base, dropout=0.1 if blocker == "adapter dropout" else 0.0)
    if blocker == "checkpointing":
        model.gradient_checkpointing_enable()
    result = shared_prefix.check(model, packing.Collator(tiny_tokenizer)(rows()))
    assert not result["used"]
    expected = {"adapter dropout": "dropout p=0.1", "base dropout": "attention_dropout",
                "checkpointing": "gradient checkpointing"}[blocker]
    assert expected in result["reason"], result


def test_a_model_that_ignores_the_cache_keeps_one_row(tiny_tokenizer, monkeypatch):
    model = lora(build_model(len(tiny_tokenizer), 0, "llama")).train()
    base = model.get_base_model()
    forward = type(base).forward

    def no_cache(self, *args, cache=None, **kwargs):  # the rows never see the prefix
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(base), "forward", no_cache)
    result = shared_prefix.check(model, packing.Collator(tiny_tokenizer)(rows()))
    assert result["layouts"] == [shared_prefix.ONE_ROW], result
    reason = result["refused"][shared_prefix.CACHE]
    assert "differ" in reason or "failed" in reason, result


def test_a_model_that_fails_both_layouts_is_not_used(tiny_tokenizer, monkeypatch):
    model = lora(build_model(len(tiny_tokenizer), 0, "llama")).train()
    base = model.get_base_model()
    forward = type(base).forward

    def neither(self, *args, cache=None, position_ids=None, **kwargs):
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(base), "forward", neither)
    result = shared_prefix.check(model, packing.Collator(tiny_tokenizer)(rows()))
    assert not result["used"] and set(result["refused"]) == set(shared_prefix.LAYOUTS), result
