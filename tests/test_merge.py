"""Merging an adapter into the full-precision or the dequantized base, and its logit checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_inputs, job_policy, pruned_adalora, stage, task_blocks

from qlora_pipeline.core.errors import InputError
from qlora_pipeline.models import checkpoint
from qlora_pipeline.training import lora, streamed_merge
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
    assert prov["stage"] == "merge"
    assert set(prov["inputs"]) == {"base", "quantized", "adapter", "tokenized"}  # what it reads


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


# ---- the streamed merge, tensor by tensor against PEFT's ---------------------------------

ADAPTER_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True},
                    "adalora": {"init_r": 4, "target_r": 2, "total_step": 10}}


@pytest.fixture(scope="module")
def sharded(prepared) -> dict:
    """The tiny base and its 4-bit checkpoint re-saved in many shards (a 4-bit weight's parts
    may land in different shards), and one non-trivial adapter per LoRA variant."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.models.quantization import load_quantized

    root = prepared["root"] / "sharded"
    dirs = {"full": root / "base", "dequantized": root / "quantized"}
    AutoModelForCausalLM.from_pretrained(prepared["base"]).save_pretrained(
        dirs["full"], max_shard_size="40KB")
    reshard(prepared["quant"], dirs["dequantized"], "8KB")
    adapters = {}
    for name, extra in ADAPTER_VARIANTS.items():
        kind = AdaLoraConfig if name == "adalora" else LoraConfig
        model = get_peft_model(load_quantized(prepared["quant"], job_policy()), kind(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra))
        if name == "adalora":
            pruned_adalora(model)
        adapters[name] = root / f"adapter-{name}"
        model.save_pretrained(adapters[name])
    return {"dirs": dirs, "adapters": adapters}


def reshard(model_dir, out_dir, max_shard_size: str) -> None:
    """A saved checkpoint's tensors in many shards, split by huggingface_hub as save_pretrained
    splits (a 4-bit checkpoint, once loaded, cannot be saved again by transformers)."""
    import shutil

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = state_dict(model_dir)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    out_dir.mkdir(parents=True)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, out_dir / name, metadata={"format": "pt"})
    (out_dir / checkpoint.INDEX).write_text(json.dumps(
        {"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    shutil.copy2(model_dir / "config.json", out_dir / "config.json")


def state_dict(model_dir: Path) -> dict:
    """Every tensor of a safetensors checkpoint (all shards)."""
    from safetensors.torch import load_file

    return {key: tensor for shard in sorted(Path(model_dir).glob("*.safetensors"))
            for key, tensor in load_file(shard).items()}


def peft_merged_state(prepared, kind: str, adapter) -> dict:
    base = merge.load_base(kind, prepared["base"], prepared["quant"], job_policy())
    return merge.with_adapter(base, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("variant", ADAPTER_VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_streamed_merge_equals_peft_merge(prepared, sharded, tmp_path, kind, variant):
    from transformers import AutoModelForCausalLM

    source = sharded["dirs"][kind]
    assert len(list(source.glob("*.safetensors"))) > 5  # really many shards
    info = streamed_merge.merge(source, sharded["adapters"][variant], tmp_path,
                                torch.float32, max_shard_bytes=30_000)
    assert info["merged_layers"] == 14 and info["shards"] > 1
    assert info["dequantized_layers"] == (14 if kind == "dequantized" else 0)

    expected = peft_merged_state(prepared, kind, sharded["adapters"][variant])
    got = state_dict(tmp_path)
    assert set(got) == set(expected) - {"lm_head.weight"}  # tied to the embeddings, as saved
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype == torch.float32, key
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)
    # A plain checkpoint that transformers loads from its index.
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.model.layers[0].self_attn.q_proj.weight,
                               expected["model.layers.0.self_attn.q_proj.weight"])


def test_streamed_merge_shard_size_bounds_every_output_shard(prepared, sharded, tmp_path):
    limit = 20_000
    streamed_merge.merge(sharded["dirs"]["full"], sharded["adapters"]["lora"], tmp_path,
                         torch.float32, max_shard_bytes=limit)
    index = json.loads((tmp_path / checkpoint.INDEX).read_text())
    largest = max(t.numel() * 4 for t in merge_state(prepared).values())
    for shard in set(index["weight_map"].values()):
        # A shard exceeds the limit only by holding a single tensor larger than it.
        size = (tmp_path / shard).stat().st_size
        assert size <= max(limit, largest) + 10_000, shard


def merge_state(prepared) -> dict:
    return state_dict(prepared["merged"]["full"])


@pytest.mark.parametrize("setting, value", [("lora_bias", True),
                                            ("alpha_pattern", {"q_proj": 32}),
                                            ("peft_type", "IA3")])
def test_streamed_merge_refuses_what_it_does_not_compute(sharded, tmp_path, setting, value):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(sharded["adapters"]["lora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, setting: value}))
    with pytest.raises(InputError, match=rf"adapter_config.json: .*{setting}"):
        streamed_merge.merge(sharded["dirs"]["full"], adapter, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


def test_streamed_merge_refuses_an_adapter_for_another_model(sharded, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(sharded["adapters"]["lora"], adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("layers.0.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"model.layers.7.* does not store"):
        streamed_merge.merge(sharded["dirs"]["full"], adapter, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()
