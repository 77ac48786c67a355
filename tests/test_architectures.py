"""Users bring their own architectures: tiny random Llama, Qwen2 (biases on q/k/v), GPT-NeoX
(fused query_key_value, biases everywhere) and Phi (dense/fc1/fc2, biases) each go through
quantize → train (all-linear) → recover → merge → evaluate, with every guard on.

A 4-bit layer with a bias is the case bitsandbytes' packed CPU kernel crashed on in the first
training step; the numerics check runs at every load here (models/numerics.py).
"""

from __future__ import annotations

import json

import pytest

from conftest import build_inputs, job_policy, save_model, stage, task_blocks
from qlora_pipeline.config import recovery_train
from qlora_pipeline.models.methods.bnb4 import linear4bit_layers
from qlora_pipeline.models.quantization import load_quantized

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
    qlora = stage("train_qlora")(quantized=quant, tokenized=tokenized, adapter=root / "qlora",
                                 lora=lora, train=train, seed=0, checkpoints=root / "ckpt")
    recovery = {**blocks["recovery"], "enabled": True, "steps": 2}
    recovered = stage("recover")(base=base, qlora=root / "qlora", tokenized=tokenized,
                                 adapter=root / "recovered", seed=0, checkpoints=root / "ckpt-r",
                                 train=recovery_train({"train": train, "recovery": recovery}))
    checks = stage("merge")(base=base, quantized=quant, adapter=root / "recovered",
                            tokenized=tokenized, merged=root / "merged", recovered=True,
                            merge={**blocks["merge"], "check_examples": 2})
    stage("eval_task_spec")(raw=root / "raw", base=base, spec=root / "spec", format="chat",
                            max_gen_tokens=4, task="arithmetic")
    scores = {}
    for variant, models in [("qlora", {"quantized": quant, "adapter": root / "qlora"}),
                            ("recovered", {"adapter": root / "recovered"}),
                            ("merged", {"merged": root / "merged"})]:
        out = {name: root / "eval" / variant / name for name in
               ("results.json", "samples.jsonl", "provenance.json")}
        stage("evaluate")(spec=root / "spec", base=base, **models, evaluation=EVAL_CFG, seed=0,
                          task="arithmetic", variant=variant, results=out["results.json"],
                          samples=out["samples.jsonl"], provenance=out["provenance.json"])
        scores[variant] = json.loads(out["results.json"].read_text())["results"]["qlora_arithmetic"]
    return {"arch": arch, "root": root, "quant": quant, "qlora": qlora,
            "recovered": recovered, "checks": checks, "scores": scores}


def test_4bit_layers_and_their_biases(run):
    layers = linear4bit_layers(load_quantized(run["quant"], job_policy()))
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
