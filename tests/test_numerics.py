"""4-bit numerics on every CPU: one path (bitsandbytes' packed AVX512-BF16 inference kernel
switched off), gradients that survive an evaluation, and a run-time check that fails loudly.

On a CPU without avx512_bf16 the packed path is still exercised where it matters: bitsandbytes
is made to believe the CPU has the flag when the layers are built, as it does on such a CPU,
so the loaders' switch must hold. The test of the real kernel runs only where the flag is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import build_inputs, job_policy, save_model, stage
from qlora_pipeline.core import machine
from qlora_pipeline.core.errors import NumericsError
from qlora_pipeline.models import numerics
from qlora_pipeline.models.methods import bnb4
from qlora_pipeline.models import quantization as quantize
from qlora_pipeline.report.quantization import report_markdown as quantization_markdown

HAS_AVX512_BF16 = "avx512_bf16" in machine.cpu_info()["numeric_flags"]
QUANT_CFG = {"method": "nf4", "double_quant": True, "compute_dtype": "auto",
             "skip_modules": ["lm_head"]}


@pytest.fixture(params=["this-cpu", "avx512bf16-cpu"])
def cpu_kind(request, monkeypatch):
    """Run the test as this CPU is, and as bitsandbytes sees a CPU with AVX512-BF16."""
    if request.param == "avx512bf16-cpu":
        import bitsandbytes.nn.modules as modules

        monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    return request.param


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def quantized(request, tmp_path_factory, tiny_tokenizer) -> dict:
    root = tmp_path_factory.mktemp(f"numerics-{request.param}")
    base = save_model(root / "base", tiny_tokenizer, request.param)
    quant, tokenized = build_inputs(root, base)
    return {"base": base, "quant": quant, "tokenized": tokenized, "arch": request.param}


def eval_pass(model, ids) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def test_loaders_keep_every_4bit_layer_off_the_packed_path(quantized, cpu_kind):
    model = quantize.load_quantized(quantized["quant"], job_policy())
    layers = bnb4.linear4bit_layers(model)
    assert layers and all(m.support_avx512bf16_for_cpu is False for _, m in layers)
    eval_pass(model, torch.tensor([[1, 5, 9, 20, 33]]))
    assert not any(bnb4.is_packed(m) for _, m in layers)

    fresh = quantize.quantize(quantized["base"], QUANT_CFG, job_policy())  # the quantize stage's model
    assert all(m.support_avx512bf16_for_cpu is False for _, m in bnb4.linear4bit_layers(fresh))


def with_adapter(model):
    """All-linear LoRA with B random (init False): A's gradient is then non-zero too."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules="all-linear",
                                            init_lora_weights=False))


def lora_gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def test_gradients_after_an_eval_pass_equal_the_dequantized_fp32_reference(quantized, cpu_kind):
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11], [4, 8, 15, 16, 23, 42, 3, 6]])
    trained = with_adapter(quantize.load_quantized(quantized["quant"], job_policy()))
    eval_pass(trained, ids)  # what Trainer.evaluate() does before training and between steps
    got = lora_gradients(trained, ids)

    reference = with_adapter(quantize.load_quantized(quantized["quant"], job_policy()).dequantize().float())
    adapter = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert not reference.load_state_dict(adapter, strict=False).unexpected_keys
    want = lora_gradients(reference, ids)

    assert set(got) == set(want) and len(want) == 2 * 7 * 2  # layers x projections x (A, B)
    for name, grad in want.items():
        gap = float((got[name] - grad).norm() / grad.norm())
        assert gap < 1e-4, (name, gap)


def test_check_names_a_layer_that_computes_something_else(quantized, monkeypatch):
    model = quantize.load_quantized(quantized["quant"], job_policy())
    layers = bnb4.linear4bit_layers(model)
    name, victim = layers[1]
    forward = type(victim).forward
    monkeypatch.setattr(victim, "forward", lambda x: forward(victim, x.bfloat16()).float())
    with pytest.raises(NumericsError, match=rf"1 of {len(layers)}: {name} \(eval"):
        numerics.check(model, torch.float32)


def test_check_names_a_layer_that_passes_no_gradient(quantized, monkeypatch):
    model = quantize.load_quantized(quantized["quant"], job_policy())
    name, victim = bnb4.linear4bit_layers(model)[0]
    forward = type(victim).forward
    monkeypatch.setattr(victim, "forward", lambda x: forward(victim, x).detach())
    with pytest.raises(NumericsError, match=rf"{name} \(eval 0.00e\+00, train "
                                                     rf"0.00e\+00, input_grad 1.00e\+00\)"):
        numerics.check(model, torch.float32)


def test_quantize_records_the_check_and_fails_without_output_when_the_path_is_wrong(
        quantized, tmp_path, monkeypatch, cpu_kind):
    out = tmp_path / "quantized"
    if cpu_kind == "this-cpu":
        stage("quantize")(base=quantized["base"], quantized=out, quantization=QUANT_CFG, seed=0)
        check = json.loads((out / "quantization.json").read_text())["numerics_check"]
        assert check["compute_dtype"] == "float32" and check["tolerance"] == 1e-4
        assert check["layers_checked"] == len(check_layers(out))
        assert all(gap <= 1e-4 for gap in check["max_relative_gap"].values()), check
        report = json.loads((out / "quantization.json").read_text())
        assert re.search(rf"largest relative gap \| \d\.\de[+-]\d+ over {len(report['layers'])} "
                         rf"layers \(tolerance 0.0001, float32\) \|",
                         quantization_markdown(report))
        return
    # As on an AVX512-BF16 CPU without the switch: the packed path is taken and refused.
    monkeypatch.setattr(bnb4, "single_path", lambda model: model)
    with pytest.raises(NumericsError, match="packed"):
        stage("quantize")(base=quantized["base"], quantized=out, quantization=QUANT_CFG, seed=0)
    assert not out.exists() and not list(tmp_path.glob(".quantized*"))


def check_layers(quant_dir: Path) -> list[dict]:
    return json.loads((quant_dir / "quantization.json").read_text())["layers"]


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="this CPU has no avx512_bf16: bitsandbytes' "
                    "packed CPU kernel does not exist here (the switch is tested above)")
def test_the_real_packed_kernel_is_refused_and_switched_off(quantized):
    """On an AVX512-BF16 CPU: bitsandbytes as shipped repacks after an eval pass, which the
    check refuses; the loaders' model does not repack and matches x @ deq(W)^T."""
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(quantized["quant"], device_map="cpu")
    eval_pass(raw, torch.tensor([[1, 5, 9, 20, 33]]))
    assert any(bnb4.is_packed(m) for _, m in bnb4.linear4bit_layers(raw))
    with pytest.raises(NumericsError, match="packed"):
        numerics.check(raw, torch.float32)

    model = quantize.load_quantized(quantized["quant"], job_policy())
    eval_pass(model, torch.tensor([[1, 5, 9, 20, 33]]))
    assert not any(bnb4.is_packed(m) for _, m in bnb4.linear4bit_layers(model))
    assert numerics.check(model, torch.float32)["max_relative_gap"]["input_grad"] < 1e-4


def test_provenance_names_the_machine(quantized):
    provenance = json.loads((quantized["quant"] / "provenance.json").read_text())
    facts = provenance["machine"]
    assert facts["cpu"]["model"] and facts["cpu"]["cores"] >= 1
    assert ("avx512_bf16" in facts["cpu"]["numeric_flags"]) == HAS_AVX512_BF16
    assert facts["torch"]["threads"] >= 1 and facts["torch"]["cpu_capability"]
    bnb = facts["bitsandbytes"]
    assert bnb["cpu_packed_inference"] == "disabled"
    assert bnb["cpu_avx512bf16_kernel_available"] == HAS_AVX512_BF16
    assert bnb["native_library"].startswith("libbitsandbytes_")


def test_cpu_info_reads_the_flags_that_change_numerics(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\n"
                       "flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile sse4_2\n")
    info = machine.cpu_info(cpuinfo)
    assert info["model"] == "AMD EPYC 9R14"
    assert info["numeric_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
