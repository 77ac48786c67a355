"""Every quantization method (models/methods/: NF4, FP4, LLM.int8, HQQ 2/3/4/8 bits) through
the quantize stage: its checkpoint saves and reloads to the same model, LoRA trains on it with
the gradient of the dequantized model, the stored bits per parameter match the formula of
docs/quantization.md, the streamed merge reads it, and the quantization sweep measures it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_inputs, job_policy, stage, task_blocks
from qlora_pipeline.config import quantization as quant_settings
from qlora_pipeline.models import methods
from qlora_pipeline.models import quantization as quant

REPO = Path(__file__).resolve().parents[1]
METHODS = {"nf4": {"method": "nf4"}, "fp4": {"method": "fp4", "double_quant": False},
           "int8": {"method": "int8"}, "hqq8": {"method": "hqq", "bits": 8},
           "hqq4": {"method": "hqq", "bits": 4}, "hqq3": {"method": "hqq", "bits": 3},
           "hqq2": {"method": "hqq", "bits": 2, "group_size": 32}}
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])


def settled(name: str) -> dict:
    return quant_settings.settle({**METHODS[name], "compute_dtype": "auto",
                                  "skip_modules": ["lm_head"]}, "quantization")


def quantized_dir(base: Path, root: Path, name: str) -> Path:
    out = root / f"quantized-{name}"
    if not out.exists():
        stage("quantize")(base=base, quantized=out, quantization=settled(name), seed=0)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def base(request, tmp_path_factory, tiny_tokenizer) -> Path:
    from benchmarks.tiny_models import save_model

    return save_model(tmp_path_factory.mktemp(f"methods-{request.param}") / "base",
                      tiny_tokenizer, request.param)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits.float()


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_saves_and_reloads_to_the_same_model(base, name):
    from qlora_pipeline.models.checkpoint import Checkpoint

    fresh = quant.quantize(base, settled(name), job_policy())  # what the stage saved
    loaded = quant.load_quantized(quantized_dir(base, base.parent, name), job_policy())
    assert quant.method_of(loaded) is methods.of(METHODS[name]["method"])
    assert len(methods.layers(loaded)) == len(methods.layers(fresh)) > 0
    assert torch.equal(logits(fresh), logits(loaded))
    report = json.loads((base.parent / f"quantized-{name}/quantization.json").read_text())
    assert report["numerics_check"]["layers_checked"] == len(methods.layers(loaded))
    # the checkpoint read a tensor at a time (streamed merge, analysis) gives deq(Q(W))
    checkpoint = Checkpoint(base.parent / f"quantized-{name}")
    for layer, module in methods.layers(loaded)[:3]:
        stored = checkpoint.weight(f"{layer}.weight")
        assert torch.allclose(stored.float(), methods.of_layer(module).dequantized(module).float(),
                              atol=1e-6)
    assert set(checkpoint.ordered_keys()) >= {f"{n}.weight" for n, _ in methods.layers(loaded)}


@pytest.mark.parametrize("name", ["int8", "hqq3", "hqq2"])
def test_lora_gradient_equals_the_dequantized_models(base, name):
    """The QLoRA gradient check: base frozen, only A and B train, and their gradient is the one
    LoRA gets on deq(Q(W)) as plain float weights (the same math; LLM.int8 also rounds inputs)."""
    from qlora_pipeline.training import lora

    cfg = {**task_blocks()["lora"], "dropout": 0.0, "target_modules": "all-linear"}
    grads, totals = {}, {}
    for kind in ("quantized", "dequantized"):
        model = quant.load_quantized(quantized_dir(base, base.parent, name), job_policy())
        if kind == "dequantized":
            model = quant.dequantized(model)
        expected = lora.expected_trainable(model, cfg)
        torch.manual_seed(0)  # the same A (random) in both
        model = lora.inject(model, cfg, gradient_checkpointing=False)
        assert lora.verify_frozen(model, expected)["trainable_params"] == expected > 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # B = 0 would leave A without gradient
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        totals[kind] = lora.trainable_summary(model)["total_params"]
    assert totals["quantized"] == totals["dequantized"]  # packed codes count as their weights
    assert grads["quantized"].keys() == grads["dequantized"].keys()
    tolerance = 5e-2 if name == "int8" else 1e-4
    for n, g in grads["quantized"].items():
        assert torch.isfinite(g).all() and g.norm() > 0, n
        gap = float((g - grads["dequantized"][n]).norm() / grads["dequantized"][n].norm())
        assert gap < tolerance, (n, gap)


@pytest.fixture(scope="module")
def smol_shaped(tmp_path_factory, tiny_tokenizer) -> Path:
    """One block of SmolLM2-135M's shapes (576 hidden, 1536 intermediate): bits per parameter
    depend on the shapes (int8's scale per row, hqq's 3-bit padding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tiny_tokenizer), hidden_size=576,
                                  intermediate_size=1536, num_hidden_layers=1,
                                  num_attention_heads=9, num_key_value_heads=3,
                                  tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("smol-shaped") / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def formula(name: str, s: int) -> float:
    """docs/quantization.md's formulas, by hand; s: bits of HQQ's scale and zero (the compute
    dtype's: 32 on the CPU, 16 on a bf16/fp16 GPU)."""
    return {"nf4": 4 + 8 / 64 + 32 / (64 * 256), "fp4": 4 + 32 / 64,
            "hqq8": 8 + 2 * s / 64, "hqq4": 4 + 2 * s / 64, "hqq3": 32 / 10 + 2 * s / 64,
            "hqq2": 2 + 2 * s / 32}[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_stored_bits_match_the_documented_formula(smol_shaped, name):
    scale_bits = torch.finfo(job_policy().compute_dtype("auto")).bits
    stage("quantize")(base=smol_shaped, quantized=smol_shaped.parent / name,
                      quantization=settled(name), seed=0)
    summary = json.loads((smol_shaped.parent / name / "quantization.json").read_text())["summary"]
    rows = json.loads((smol_shaped.parent / name / "quantization.json").read_text())["layers"]
    if name == "int8":  # 8 + 32/n_in, n_in 576 (attention, gate, up) or 1536 (down)
        expected = sum((8 + 32 / r["shape"][1]) * r["params"] for r in rows) / \
            sum(r["params"] for r in rows)
    else:
        expected = formula(name, scale_bits)
    assert summary["bits_per_param_theoretical"] == pytest.approx(expected, rel=1e-4)
    assert summary["bits_per_param_measured"] == pytest.approx(expected, rel=0.02), summary
    assert summary["bits_per_param_measured"] >= expected * 0.999  # nothing left uncounted


def test_docs_write_each_formula():
    text = (REPO / "docs/quantization.md").read_text(encoding="utf-8")
    for formula in ("4 + 8/64 + 32/(64·256)", "8 + 32/n_in", "32/10", "2·s/g"):
        assert formula in text, formula


def test_streamed_merge_of_an_hqq_base_is_base_plus_adapter(base, tmp_path):
    """The dequantized merge of an adapter trained on an HQQ base: read from the checkpoint a
    tensor at a time, it computes what the dequantized base with the adapter unmerged does."""
    from peft import LoraConfig, get_peft_model

    from qlora_pipeline.training import merging, streamed_merge

    quant_dir = quantized_dir(base, base.parent, "hqq3")
    model = quant.load_quantized(quant_dir, job_policy())
    targets = ["q_proj", "v_proj"] if "q_proj" in str(model) else ["query_key_value"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    streamed_merge.merge(quant_dir, tmp_path / "adapter", tmp_path / "merged", torch.float32)
    merged = quant.load_full_precision(tmp_path / "merged", job_policy())
    unmerged = merging.with_adapter(merging.load_base("dequantized", base, quant_dir,
                                                      job_policy()), tmp_path / "adapter")
    assert torch.allclose(logits(merged), logits(unmerged), atol=1e-4)


def test_quantization_sweep_measures_each_method(tmp_path, tiny_model_dir):
    quantized, tokenized = build_inputs(tmp_path, tiny_model_dir)
    stage("quantization_report")(base=tiny_model_dir, quantized=quantized, tokenized=[tokenized],
                                 tasks=["arithmetic"], max_examples=8,
                                 **{k: tmp_path / f"q.{k}" for k in ("report", "markdown",
                                                                     "provenance")})
    points = []
    for name in ("hqq2", "int8"):
        points.append(tmp_path / "sweep" / name)
        stage("quantization_sweep_point")(base=tiny_model_dir, tokenized=[tokenized],
                                          report=points[-1], point=settled(name),
                                          tasks=["arithmetic"], max_examples=8, seed=0)
        point = json.loads((points[-1] / "report.json").read_text())
        assert point["label"] == quant_settings.label(settled(name))
        assert point["perplexity"]["arithmetic"]["perplexity"] > 1
        assert not list(points[-1].glob("*.safetensors"))  # measured, not saved
    # The report's section of the sweep (report/quantization_sweep.py), as the report writes it
    files = [tmp_path / "q.report", *points]
    outputs = {"markdown": tmp_path / "report.md", "provenance": tmp_path / "report.json",
               "quantization_sweep": tmp_path / "quantization_sweep.csv",
               "quantization_sweep_plot": tmp_path / "quantization_sweep.png"}
    stage("report")(files=files, sections={"quantization_sweep": files}, tables={}, **outputs)
    import pandas as pd

    table = pd.read_csv(outputs["quantization_sweep"])
    assert list(table["method"]) == ["hqq2-g32", "nf4 (configured)", "int8"]  # by bits
    assert table["bits_per_param"].is_monotonic_increasing
    # 2-bit costs more perplexity than LLM.int8 (8 bits) on the same base
    assert table.loc[0, "arithmetic_change_pct"] > table.loc[2, "arithmetic_change_pct"]
    assert "## Bits per parameter against perplexity" in outputs["markdown"].read_text()
    assert outputs["quantization_sweep_plot"].stat().st_size > 0


def test_a_group_size_that_divides_no_layer_is_refused(base, tmp_path):
    from qlora_pipeline.core.errors import InputError

    settings = {**settled("hqq4"), "group_size": 24}  # 64·64 weights: not a multiple of 24
    with pytest.raises(InputError, match="quantization.group_size: found 24"):
        stage("quantize")(base=base, quantized=tmp_path / "q", quantization=settings, seed=0)
    assert not (tmp_path / "q").exists()


def test_the_example_sweep_config_loads():
    """config/examples/quantization-sweep.yaml laid over config/config.yaml, as --configfile
    lays it: seven methods, each with quantization's compute dtype and skipped modules."""
    import yaml

    from qlora_pipeline.config import deep_merge, load_config

    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    example = yaml.safe_load((REPO / "config/examples/quantization-sweep.yaml").read_text())
    config = load_config(deep_merge(base, example), root=REPO)[0]
    labels = [quant_settings.label(p) for p in config["quantization_sweep"]]
    assert labels == ["nf4-nodq", "fp4", "int8", "hqq8-g64", "hqq4-g64", "hqq3-g64", "hqq2-g64"]
    assert all(p["skip_modules"] == ["lm_head"] for p in config["quantization_sweep"])


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8", "hqq3"])
def test_quantize_tensor_equals_the_whole_model_quantize(base, name):
    """deq(Q(W)) of one weight read from the full-precision base (LoftQ's Q) is the stage's."""
    from qlora_pipeline.models.checkpoint import Checkpoint

    method = methods.of(METHODS[name]["method"])
    loaded = quant.load_quantized(quantized_dir(base, base.parent, name), job_policy())
    for layer, module in methods.layers(loaded):
        weight = Checkpoint(base).weight(f"{layer}.weight")
        alone = method.quantize_tensor(weight, settled(name), job_policy())
        assert torch.equal(alone, method.dequantized(module)), layer
