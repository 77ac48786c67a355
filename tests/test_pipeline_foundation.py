"""The data and model stages run through Snakemake on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TASKS


@pytest.fixture(scope="module")
def finished(tiny_run):
    return tiny_run


def test_dry_run_lists_every_stage_for_every_task(workdir, run_snakemake):
    out = run_snakemake(workdir, "-n", "--quiet", "rules").stdout
    for rule, count in [("fetch_dataset", 2), ("tokenize", 2), ("import_base_model", 1),
                        ("quantize", 1), ("quantization_report", 1)]:
        assert any(line.split()[:2] == [rule, str(count)] for line in out.splitlines()), out


def test_outputs_load_with_standard_libraries(finished):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = finished / "results"
    for task in TINY_TASKS:
        data = load_from_disk(str(results / "data" / task / "tokenized"))
        assert set(data) == {"train", "validation", "test"}
        assert len(data["train"]) > len(data["validation"]) > 0
        assert set(data["train"].column_names) >= {"input_ids", "labels", "attention_mask"}
    AutoTokenizer.from_pretrained(results / "models/base")
    model4 = AutoModelForCausalLM.from_pretrained(results / "models/quantized")
    import bitsandbytes as bnb

    assert isinstance(model4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    logits = model4(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model4.config.vocab_size


def test_every_output_directory_has_provenance(finished):
    results = finished / "results"
    for directory in [results / "models/base", results / "models/quantized",
                      *[results / "data" / t / s for t in TINY_TASKS for s in ("raw", "tokenized")],
                      results / "quantization"]:
        prov = json.loads((directory / "provenance.json").read_text())
        assert {"params", "params_hash", "wildcards", "inputs", "packages", "device",
                "started", "finished"} <= set(prov), directory
        assert prov["packages"]["transformers"]


def test_quantization_report_numbers(finished):
    report = json.loads((finished / "results/quantization/report.json").read_text())
    summary = report["summary"]
    assert summary["bits_per_param_theoretical"] == pytest.approx(4.127, abs=1e-3)
    # In 64x64 layers the per-layer constants (two code tables) add ~2 bits; see
    # test_quantize.py for the exact count on a realistic layer.
    assert summary["bits_per_param_theoretical"] < summary["bits_per_param_measured"] < 6.5
    assert 0 < summary["relative_error_max"] < 0.2
    assert summary["size_bytes_quantized"] < summary["size_bytes_full_precision"]
    for task in TINY_TASKS:
        ppl = report["perplexity"][task]
        assert ppl["full_precision"]["perplexity"] > 1 and ppl["quantized"]["perplexity"] > 1
    assert "| arithmetic |" in (finished / "results/quantization/report.md").read_text()


def test_rerun_with_no_change_does_nothing(finished, run_snakemake):
    out = run_snakemake(finished, "-n").stdout
    assert "Nothing to be done" in out, out


def test_logs_and_benchmarks_written(finished):
    logs = finished / "results/logs"
    assert "rule quantize: done" in (logs / "quantize.log").read_text()
    assert (finished / "results/benchmarks/quantize.tsv").read_text().startswith("s\t")
