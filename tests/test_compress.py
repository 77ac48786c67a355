"""Adapter compression against numbers known in advance: updates of planted ranks inside r = 8
adapters cut to those ranks give the same logits (PEFT loads the result, rank_pattern and all);
a cut below the planted rank equals numpy's truncated SVD; bad adapters are refused."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import build_model

from qlora_pipeline.analysis import compress
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.core.errors import NumericsError
from qlora_pipeline.models.adapter_file import read_adapter

R = 8
S_TRUE = (0.6, 0.2, 0.05)  # the planted singular values of ΔW, largest first


def planted(out: int, inp: int, rank: int, scaling: float, gen: torch.Generator):
    """(A [R×in], B [out×R]) with scaling·B·A = U·diag(S_TRUE[:rank])·Vᵀ, mixed by a random
    invertible M so that neither factor shows the spectrum (B has full rank R)."""
    U = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64)).Q
    B = torch.zeros(out, R, dtype=torch.float64)
    B[:, :rank] = U * torch.tensor(S_TRUE[:rank], dtype=torch.float64) / scaling
    B[:, rank:] = torch.randn(out, R - rank, generator=gen, dtype=torch.float64)
    A = torch.zeros(R, inp, dtype=torch.float64)
    A[:rank] = V.T
    M = torch.randn(R, R, generator=gen, dtype=torch.float64) + 3 * torch.eye(R)
    return (torch.linalg.inv(M) @ A).float(), (B @ M).float()


def peft_adapter(tmp_path, tokenizer, arch: str, ranks, rslora: bool = False, dora=False):
    """A saved r = 8 all-linear adapter on the tiny `arch` model whose i-th layer's ΔW has
    rank ranks(i); returns (adapter dir, {module: planted rank})."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(len(tokenizer), arch=arch), LoraConfig(
        r=R, lora_alpha=16, target_modules="all-linear", use_rslora=rslora, use_dora=dora))
    gen = torch.Generator().manual_seed(0)
    planned = {}
    for i, (name, module) in enumerate((n, m) for n, m in model.named_modules()
                                       if hasattr(m, "lora_A") and "default" in m.lora_A):
        layer_a, layer_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        rank = ranks(i)
        A, B = planted(layer_b.shape[0], layer_a.shape[1], rank, module.scaling["default"],
                       gen)
        with torch.no_grad():
            layer_a.copy_(A)
            layer_b.copy_(B)
        planned[name.removeprefix("base_model.model.")] = rank
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path, planned


def logits(tokenizer, arch: str, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_model(len(tokenizer), arch=arch), adapter_dir)
    batch = tokenizer(["3 + 4 = 7", "the weather is sunny"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits, model


def lora_a_ranks(model) -> dict[str, int]:
    prefix, suffix = "base_model.model.", ".lora_A.default.weight"
    return {n[len(prefix):-len(suffix)]: p.shape[0] for n, p in model.named_parameters()
            if n.endswith(suffix)}


@pytest.mark.parametrize("arch, rslora", [("llama", False), ("gpt_neox", True)])
def test_rank2_updates_compress_to_rank_2_with_the_same_logits(tmp_path, tiny_tokenizer, arch,
                                                                rslora):
    source, planned = peft_adapter(tmp_path, tiny_tokenizer, arch, lambda i: 2, rslora)
    reference, _ = logits(tiny_tokenizer, arch, source)
    for keep in ({"rank": 2}, {"energy": 0.999}):
        out = tmp_path / f"compressed-{next(iter(keep))}"
        out.mkdir()
        summary = compress.compress(source, out, keep)
        found, model = logits(tiny_tokenizer, arch, out)
        assert lora_a_ranks(model) == planned  # every layer at rank 2
        assert (found - reference).abs().max() < 1e-4
        widths = [sum(u.A.shape[1:]) + u.B.shape[0] for u in read_adapter(source).values()]
        assert summary["parameters"] == {"before": R * sum(widths), "after": 2 * sum(widths),
                                         "ratio": pytest.approx(2 / R)}
        assert summary["bytes"]["after"] < summary["bytes"]["before"] / 3
        assert summary["energy_kept"]["min"] == pytest.approx(1.0, abs=1e-6)
        assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {}
    # The adapter changes the logits, so the equality above is not the trivial one.
    base = build_model(len(tiny_tokenizer), arch=arch)
    batch = tiny_tokenizer(["3 + 4 = 7", "the weather is sunny"], return_tensors="pt",
                           padding=True)
    with torch.no_grad():
        assert (base(**batch).logits - reference).abs().max() > 1e-2


def test_energy_gives_each_layer_its_rank_through_rank_pattern(tmp_path, tiny_tokenizer):
    source, planned = peft_adapter(tmp_path, tiny_tokenizer, "llama", lambda i: 1 + i % 3)
    reference, _ = logits(tiny_tokenizer, "llama", source)
    out = tmp_path / "compressed"
    out.mkdir()
    summary = compress.compress(source, out, {"energy": 0.9999})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3
    assert config["rank_pattern"] == {m: k for m, k in planned.items() if k != 3}
    found, model = logits(tiny_tokenizer, "llama", out)
    assert lora_a_ranks(model) == planned
    assert (found - reference).abs().max() < 1e-4
    assert summary["rank_after"] == {"min": 1, "max": 3,
                                     "mean": pytest.approx(np.mean(list(planned.values())))}


def test_a_cut_below_the_planted_rank_is_numpys_truncated_svd(tmp_path, tiny_tokenizer):
    source, planned = peft_adapter(tmp_path, tiny_tokenizer, "llama", lambda i: 2)
    out = tmp_path / "compressed"
    out.mkdir()
    summary = compress.compress(source, out, {"rank": 1})
    before, after = read_adapter(source), read_adapter(out)
    assert set(after) == set(before) and len(after) == len(planned)
    error = S_TRUE[1] / math.hypot(*S_TRUE[:2])
    for key, update in before.items():
        dense = update.scaling * (update.B.double() @ update.A.double()).numpy()
        U, S, Vt = np.linalg.svd(dense)
        best = S[0] * np.outer(U[:, 0], Vt[0])
        cut = after[key]
        assert cut.A.shape[0] == 1
        np.testing.assert_allclose(cut.delta().double().numpy(), best, atol=1e-5)
        record = summary["per_layer"][key.removesuffix(".weight")]
        assert record["relative_error"] == pytest.approx(error, abs=1e-5)
        assert record["energy_kept"] == pytest.approx(1 - error ** 2, abs=1e-5)
        # Balanced factors: each holds √(S₁/s₁) of the one direction (s₁ = α/1 = 16).
        assert float(cut.A.norm()) == pytest.approx(math.sqrt(S_TRUE[0] / 16), rel=1e-5)
        assert float(cut.B.norm()) == pytest.approx(math.sqrt(S_TRUE[0] / 16), rel=1e-5)


def test_a_zero_update_stays_zero_at_rank_1(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(len(tiny_tokenizer)),
                           LoraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")  # PEFT's init: B = 0, so ΔW = 0
    out = tmp_path / "compressed"
    out.mkdir()
    summary = compress.compress(tmp_path / "adapter", out, {"energy": 0.9})
    assert summary["rank_after"]["max"] == 1
    for update in read_adapter(out).values():
        assert torch.isfinite(update.A).all() and torch.isfinite(update.B).all()
        assert float(update.delta().abs().max()) == 0.0
    assert summary["relative_error"]["max"] == 0.0


def test_dora_is_refused(tmp_path, tiny_tokenizer):
    source, _ = peft_adapter(tmp_path, tiny_tokenizer, "llama", lambda i: 2, dora=True)
    out = tmp_path / "compressed"
    out.mkdir()
    with pytest.raises(InputError, match="DoRA"):
        compress.compress(source, out, {"rank": 2})


def test_factors_that_lose_the_spectrum_fail_loudly():
    A, B = torch.eye(2, 6), torch.eye(5, 2)
    compress.check_factors(A, B, 1.0, torch.tensor([1.0, 1.0]), {})
    with pytest.raises(NumericsError, match="singular values"):
        compress.check_factors(A, B, 1.0, torch.tensor([1.0, 0.5]), {})


def test_the_pipeline_compresses_and_scores_the_compressed_variant(tiny_run):
    """On the session's tiny run (topic: compress {rank: 1}): the compress_adapter job's
    adapter is the rank-1 cut of the QLoRA adapter's every ΔW, scored on the quantized base,
    and the report sets its size beside the QLoRA adapter's."""
    from qlora_pipeline.core import layout

    folder = tiny_run / layout.adapter("topic", "compressed")
    info = json.loads((folder / "compression.json").read_text())
    assert info["task"] == "topic" and info["keep"] == {"rank": 1}
    assert json.loads((folder / "provenance.json").read_text())["stage"] == "compress_adapter"
    before, after = read_adapter(tiny_run / layout.adapter("topic", "qlora")), read_adapter(folder)
    assert set(after) == set(before)
    for key, update in before.items():
        U, S, Vt = np.linalg.svd(update.delta().double().numpy())
        np.testing.assert_allclose(after[key].delta().double().numpy(),
                                   S[0] * np.outer(U[:, 0], Vt[0]), atol=1e-6)
    assert info["parameters"]["ratio"] == pytest.approx(1 / before[key].A.shape[0])
    results = json.loads((tiny_run / layout.evaluation("compressed", "topic")["results"])
                         .read_text())
    assert results["variant"] == "compressed"
    report = (tiny_run / f"{layout.report()}/report.md").read_text()
    assert re.search(r"## Compression[^#]*\n\| topic +\| rank 1 +\|", report)


def compress_of(defaults: dict | None, task: dict | None):
    import copy

    import yaml
    from conftest import REPO

    from qlora_pipeline.config import load_config

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config = copy.deepcopy(config)
    if defaults is not None:
        config["defaults"]["compress"] = defaults
    if task is not None:
        config["task_overrides"] = {"topic": {"compress": task}}
    return load_config(config, root=REPO)[1]["topic"]["compress"]


def test_a_tasks_compress_replaces_the_defaults_whole():
    assert compress_of(None, None) is None  # topic.yaml sets none
    assert compress_of({"energy": 0.8}, None) == {"energy": 0.8}
    assert compress_of({"energy": 0.8}, {"rank": 3}) == {"rank": 3}  # not {energy, rank}


@pytest.mark.parametrize("value, message", [
    ({}, "key 'compress': found none of energy, rank; expected exactly one of: energy | rank"),
    ({"energy": 0.9, "rank": 2}, "found energy, rank; expected exactly one of"),
    ({"energy": 1.5}, "key 'compress.energy': found 1.5, expected a number <= 1"),
    ({"rank": 0}, "key 'compress.rank': found 0, expected a number >= 1"),
    ({"energ": 0.9}, "'energ' (did you mean 'energy'?)"),
])
def test_bad_compress_settings_are_refused(value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        compress_of(None, value)
