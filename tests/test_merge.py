"""Merging an adapter into the full-precision or the dequantized base, and its logit checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_inputs, job_policy, stage, task_blocks
from qlora_pipeline.errors import InputError
from qlora_pipeline.training import lora
from qlora_pipeline.training import merging as merge

KINDS = ("dequantized", "full")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> dict:
    """A quantized base, tokenized data and a non-trivial adapter (random B), then both
    merges."""
    from qlora_pipeline.models.quantization import load_quantized

    root = tmp_path_factory.mktemp("merge")
    quant, tokenized = build_inputs(root, tiny_model_dir)
    adapter = root / "adapter"

    # An adapter as if trained: B = 0 would make every merge trivially exact.
    model = lora.inject(load_quantized(quant, job_policy()), {**task_blocks()["lora"],
                                                "target_modules": "all-linear"}, False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(adapter)

    merged = {}
    for kind in KINDS:
        cfg = {**task_blocks()["merge"], "base": kind, "compare_bases": True}
        merged[kind] = root / f"merged-{kind}"
        stage("merge")(base=tiny_model_dir, quantized=quant, adapter=adapter, tokenized=tokenized,
                       merge=cfg, merged=merged[kind], recovered=False)
    return {"base": tiny_model_dir, "quant": quant, "tokenized": tokenized, "adapter": adapter,
            "merged": merged, "root": root}


def prompts(prepared, n: int = 8) -> list[list[int]]:
    from datasets import load_from_disk

    test = load_from_disk(str(prepared["tokenized"]))["test"]
    return [e["input_ids"] for e in test.select(range(min(n, len(test))))]


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_is_a_plain_checkpoint(prepared, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = prepared["merged"][kind]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert not any("lora_" in k for k in model.state_dict())
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    if not torch.cuda.is_available():  # float32 on the CPU (bfloat16 with CUDA)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(prepared["base"]))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "merge" and set(prov["inputs"]) == {"base", "quantized", "adapter"}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_check_covers_both_bases(prepared, kind):
    check = json.loads((prepared["merged"][kind] / "merge_check.json").read_text())
    assert check["chosen"] == kind and check["recovered"] is False
    assert check["examples"] == len(prompts(prepared))
    checks = check["checks"]
    assert set(checks) == set(KINDS)
    for base in KINDS:  # the merge arithmetic holds on either base
        assert checks[base]["vs_unmerged"]["max_abs_logit_gap"] < 1e-4
        assert checks[base]["vs_unmerged"]["top1_agreement"] == 1.0
    # Merged into deq(Q(W0)): the very model that was trained on the 4-bit base.
    trained = checks["dequantized"]["vs_trained"]
    assert trained["max_abs_logit_gap"] < 1e-3
    assert trained["top1_agreement"] == 1.0
    # Merged into W0: off by the quantization error, which the check must show.
    assert checks["full"]["vs_trained"]["max_abs_logit_gap"] > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_merged_logits_match_base_plus_adapter(prepared, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = prompts(prepared, 4)
    merged = merge.logits(AutoModelForCausalLM.from_pretrained(prepared["merged"][kind]), ids)
    base = merge.load_base(kind, prepared["base"], prepared["quant"], job_policy())
    without = merge.logits(base, ids)
    unmerged = merge.logits(PeftModel.from_pretrained(base, prepared["adapter"]), ids)
    assert max_gap(merged, without) > 1e-2  # the adapter does change the model
    assert max_gap(merged, unmerged) < 1e-4


def test_dequantized_merge_reproduces_the_trained_model(prepared):
    from transformers import AutoModelForCausalLM

    ids = prompts(prepared, 4)
    merged = merge.logits(AutoModelForCausalLM.from_pretrained(
        prepared["merged"]["dequantized"]), ids)
    trained = merge.trained_model_logits(prepared["quant"], prepared["adapter"], ids,
                                         job_policy())
    assert max_gap(merged, trained) < 1e-3


def test_resolve_base():
    assert merge.resolve_base("auto", recovered=True) == "full"
    assert merge.resolve_base("auto", recovered=False) == "dequantized"
    assert merge.resolve_base("full", recovered=False) == "full"
    assert merge.resolve_base("dequantized", recovered=True) == "dequantized"


def test_auto_after_recovery_merges_into_full_only(prepared, tmp_path):
    cfg = {**task_blocks()["merge"], "compare_bases": False, "check_examples": 2}
    assert cfg["base"] == "auto"
    checks = stage("merge")(base=prepared["base"], quantized=prepared["quant"],
                            adapter=prepared["adapter"], tokenized=prepared["tokenized"], merge=cfg,
                            merged=tmp_path / "merged", recovered=True)
    assert set(checks) == {"full"}
    record = json.loads((tmp_path / "merged/merge_check.json").read_text())
    assert record["chosen"] == "full" and record["recovered"] is True
    assert record["examples"] == 2


def test_missing_adapter_is_input_error(prepared, tmp_path):
    with pytest.raises(InputError, match=r"merge: no QLoRA adapter at .*nowhere"):
        stage("merge")(base=prepared["base"], quantized=prepared["quant"],
                       adapter=tmp_path / "nowhere", tokenized=prepared["tokenized"],
                       merge=task_blocks()["merge"], merged=tmp_path / "merged", recovered=False)
    assert not any(p.name == "merged" or p.name.startswith(".merged.")
                   for p in tmp_path.iterdir())
