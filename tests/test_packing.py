"""Padding-free packing without cross-contamination: several whole examples per row, each
attending only to itself (training/packing.py), on four architectures."""

from __future__ import annotations

import pytest
import torch

from conftest import build_inputs, build_model, stage, task_blocks
from qlora_pipeline.data.tokenize import pack
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.training import packing

ARCHS = ("llama", "qwen2", "gpt_neox", "phi")


def examples(lengths, seed=0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:],
                    "attention_mask": [1] * n})
    return out


def loss(logits, ids) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])))


def test_pack_restarts_positions_per_example():
    rows = pack(examples([3, 4, 2, 6]), max_length=8)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5]]


def test_collator_leaves_unpacked_batches_as_they_were(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    rows = examples([5, 9])
    ours = packing.Collator(tiny_tokenizer)([dict(r) for r in rows])
    plain = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(
        [dict(r) for r in rows])
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in ours)


def test_collator_gives_positions_and_no_mask_for_packed_rows(tiny_tokenizer):
    rows = pack(examples([3, 4, 2, 6]), max_length=8)
    batch = packing.Collator(tiny_tokenizer)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"][0, -1] == -100  # padding carries no loss


@pytest.mark.parametrize("arch", ARCHS)
def test_each_packed_example_scores_as_if_alone(tiny_tokenizer, arch):
    model = build_model(len(tiny_tokenizer), 0, arch).eval()
    model.config.use_cache = False
    singles = examples([7, 12, 5, 9, 3])
    rows = pack(singles, max_length=24)
    assert len(rows) == 2 and len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])
    batch = packing.Collator(tiny_tokenizer)([dict(r) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        gaps, row, start = [], 0, 0
        for single in singles:
            ids = single["input_ids"]
            if start + len(ids) > len(rows[row]["input_ids"]):
                row, start = row + 1, 0
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            gaps.append(abs(loss(logits[row, start:start + len(ids)], ids) - loss(alone, ids)))
            start += len(ids)
    assert max(gaps) < 1e-4, gaps
    assert packing.check_isolation(model, rows[0])["max_loss_gap"] < 1e-4


def test_a_model_that_leaks_is_refused(tiny_tokenizer):
    """With a KV cache in the forward, transformers falls back to plain causal attention:
    the check sees the examples attend to each other and fails the job."""
    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    model.config.use_cache = True
    row = pack(examples([7, 12, 5]), max_length=24)[0]
    with pytest.raises(InputError, match=r"tokenize.packing: examples packed .* attend to each"):
        packing.check_isolation(model, row)


def test_qlora_trains_on_packed_rows(tmp_path, tiny_model_dir):
    """The tokenize stage packs the train split only; train_qlora checks isolation first."""
    from datasets import load_from_disk

    quant, _ = build_inputs(tmp_path, tiny_model_dir)
    stage("tokenize")(raw=tmp_path / "raw", base=tiny_model_dir, tokenized=tmp_path / "packed",
                      format="chat",
                      tokenize={"max_length": 128, "train_on_prompt": False, "packing": True})
    data = load_from_disk(str(tmp_path / "packed"))
    assert packing.is_packed(data["train"])
    assert not packing.is_packed(data["validation"]) and not packing.is_packed(data["test"])
    assert len(data["train"]) < 64  # 64 training examples, several per row
    train = {**task_blocks()["train"], "max_steps": 4, "eval_steps": 2, "batch_size": 4,
             "learning_rate": 5e-3, "logging_steps": 1}
    summary = stage("train_qlora")(quantized=quant, tokenized=tmp_path / "packed",
                                   adapter=tmp_path / "qlora", lora=task_blocks()["lora"],
                                   train=train, seed=0, checkpoints=tmp_path / "ckpt")
    check = summary["packing_check"]
    assert check["examples"] >= 2 and check["max_loss_gap"] < 1e-4, check
    assert summary["steps"] == 4 and summary["eval_loss_best"] <= summary["eval_loss_initial"]
