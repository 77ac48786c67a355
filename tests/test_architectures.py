"""Users bring their own architectures: tiny random Llama, Qwen2 (biases on q/k/v), GPT-NeoX
(fused query_key_value, biases everywhere) and Phi (dense/fc1/fc2, biases) each go through
quantize → train (all-linear) → recover → merge → evaluate, with every guard on.

A 4-bit layer with a bias is the case bitsandbytes' packed CPU kernel crashed on in the first
training step; the numerics check runs at every load here (models/numerics.py).
"""

from __future__ import annotations

import json

import pytest

from conftest import build_inputs, save_model, task_blocks
from qlora_pipeline.evaluation import stages as estages
from qlora_pipeline.models.numerics import linear4bit_layers
from qlora_pipeline.models.quantize import load_quantized
from qlora_pipeline.training import stages as tstages

ARCHITECTURES = {"llama": False, "qwen2": True, "gpt_neox": True, "phi": True}  # biases?
EVAL_CFG = {"benchmarks": [], "num_fewshot": 0, "limit": 3, "batch_size": "auto",
            "max_gen_tokens": 4}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def run(request, tmp_path_factory, tiny_tokenizer) -> dict:
    arch, root = request.param, tmp_path_factory.mktemp(f"arch-{request.param}")
    base = save_model(root / "base", tiny_tokenizer, arch)
    quant, tokenized = build_inputs(root, base)
    blocks = task_blocks()
    lora = {**blocks["lora"], "target_modules": "all-linear"}
    train = {**blocks["train"], "max_steps": 8, "eval_steps": 4, "logging_steps": 1,
             "learning_rate": 5e-3, "batch_size": 8}
    qlora = tstages.train_qlora(quant, tokenized, lora, train, 0, root / "qlora", root / "ckpt")
    recovery = {**blocks["recovery"], "enabled": True, "steps": 2}
    recovered = tstages.recover(base, root / "qlora", tokenized, recovery, train, 0,
                                root / "recovered", root / "ckpt-r")
    checks = tstages.merge_adapter(base, quant, root / "recovered", tokenized,
                                   {**blocks["merge"], "check_examples": 2},
                                   root / "merged", recovered=True)
    estages.eval_task_spec("arithmetic", root / "raw", base, "chat", 4, root / "spec")
    paths = {"base": str(base), "base_4bit": str(quant), "merged": str(root / "merged")}
    scores = {}
    for variant, adapter in [("qlora", root / "qlora"), ("recovered", root / "recovered"),
                             ("merged", None)]:
        out = root / "eval" / variant / "results.json"
        estages.evaluate_variant(variant, "arithmetic", {**paths, "adapter": adapter and
                                                         str(adapter)},
                                 root / "spec", EVAL_CFG, 0, out)
        scores[variant] = json.loads(out.read_text())["results"]["qlora_arithmetic"]
    return {"arch": arch, "root": root, "quant": quant, "qlora": qlora,
            "recovered": recovered, "checks": checks, "scores": scores}


def test_4bit_layers_and_their_biases(run):
    layers = linear4bit_layers(load_quantized(run["quant"]))
    assert len(layers) >= 2 * 4  # every projection of both layers is 4-bit
    assert any(m.bias is not None for _, m in layers) == ARCHITECTURES[run["arch"]]


def test_training_learns_through_every_adapted_layer(run):
    summary = run["qlora"]
    assert summary["steps"] == 8
    assert summary["eval_loss_best"] < summary["eval_loss_initial"] - 0.05, summary
    metrics = [json.loads(line) for line in
               (run["root"] / "qlora" / "metrics.jsonl").read_text().splitlines()]
    norms = [m["grad_norm"] for m in metrics if "grad_norm" in m]
    assert len(norms) == 8 and min(norms) > 0


def test_recovery_and_merge(run):
    assert run["recovered"]["steps"] == 2
    assert run["recovered"]["trainable_params"] == run["qlora"]["trainable_params"]
    full = run["checks"]["full"]  # the recovered adapter merges into the fp base
    assert full["vs_unmerged"]["max_abs_logit_gap"] < 1e-3, full


def test_every_variant_is_scored(run):
    for variant, scores in run["scores"].items():
        assert 0 <= scores["exact_match,strip"] <= 1, (variant, scores)
