"""The analyze_adapter stage and the effective-rank log of training, on the session's tiny run
(conftest.tiny_run): every trained adapter analysed against the base it was trained on, its
numbers consistent with the adapter's own tensors, and the report showing them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_TASKS, stage
from safetensors.torch import load_file

from qlora_pipeline.core import layout
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.models.checkpoint import Checkpoint
from qlora_pipeline.models.adapter_file import read_adapter

KINDS = [(task, kind) for task, cfg in TINY_TASKS.items()
         for kind in (["qlora", "recovered"] if cfg.get("recovery", {}).get("enabled")
                      else ["qlora"])]
SETTINGS = {"energy": 0.9, "saturation": 0.9,
            "intruders": {"enabled": True, "k": 4, "reference": 16, "threshold": 0.5}}


@pytest.mark.parametrize(("task", "kind"), KINDS)
def test_every_adapter_is_analysed(tiny_run, task, kind):
    folder = tiny_run / layout.analysis(task, kind)
    layers = json.loads((folder / "layers.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    adapter = load_file(tiny_run / layout.adapter(task, kind) / "adapter_model.safetensors")
    assert len(layers) == sum(key.endswith("lora_A.weight") for key in adapter)
    assert summary["task"] == task and summary["kind"] == kind
    assert set(summary["summary"]["by_depth"]) <= {"shallow", "middle", "deep"}
    assert "lora:" in summary["recommendation"]["snippet"]
    for record in layers.values():
        assert len(record["singular_values"]) == record["rank"] == summary["r"]
        assert record["relative_norm"] > 0 and record["intruders"] is not None
    assert (folder / "analysis.md").read_text().startswith(f"### {task}: {kind} adapter")
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["stage"] == "analyze_adapter"


def test_numbers_match_the_dense_update_against_the_trained_base(tiny_run):
    """‖ΔW‖_F, the singular values and ‖ΔW‖_F/‖W0‖_F of a QLoRA adapter, recomputed densely:
    W0 is the dequantized 4-bit weight the adapter was trained on."""
    layers = json.loads((tiny_run / layout.analysis("arithmetic", "qlora") / "layers.json")
                        .read_text())
    updates = read_adapter(tiny_run / layout.adapter("arithmetic", "qlora"))
    base = Checkpoint(tiny_run / layout.quantized())
    for key, update in updates.items():
        delta = update.delta().double().numpy()
        w0 = base.weight(key).double().numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)[:update.A.shape[0]]
        np.testing.assert_allclose(layers[key]["singular_values"], sigma, rtol=1e-4, atol=1e-6)
        assert layers[key]["relative_norm"] == pytest.approx(
            np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-4)


def test_training_logs_the_effective_rank_at_each_evaluation(tiny_run):
    lines = [json.loads(line) for line in (tiny_run / layout.adapter("arithmetic", "qlora")
                                           / "metrics.jsonl").read_text().splitlines()]
    ranks = [line for line in lines if "adapter" in line]
    evaluations = [line for line in lines if "eval_loss" in line]
    assert [r["step"] for r in ranks] == [e["step"] for e in evaluations]
    first, last = ranks[0]["adapter"], ranks[-1]["adapter"]
    assert set(first) == {"q_proj", "v_proj"}
    assert all(m["effective_rank"] == 0 and m["fro"] == 0 for m in first.values())  # B = 0
    assert all(m["effective_rank"] > 1 and m["fro"] > 0 for m in last.values())


def test_the_report_shows_the_analyses(tiny_run):
    text = (tiny_run / f"{layout.report()}/report.md").read_text()
    assert "## Adapters" in text
    for task, kind in KINDS:
        assert f"### {task}: {kind} adapter" in text
    assert (tiny_run / f"{layout.report()}/adapters.png").stat().st_size > 10_000


def test_an_adapter_of_another_model_is_refused(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run / layout.adapter("topic", "qlora"), adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("layers.0.", "layers.9."): v for k, v in tensors.items()},
              adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="does not store"):
        stage("analyze_adapter")(adapter=adapter, base=tiny_run / layout.quantized(),
                                 analysis=tmp_path / "out", settings=SETTINGS, task="topic",
                                 name="qlora")
    assert not (tmp_path / "out").exists()


def test_memory_holds_one_base_layer(tiny_run, tmp_path, monkeypatch):
    """The base is read tensor by tensor: never more than one base weight alive at once."""
    import weakref

    from qlora_pipeline.models import checkpoint

    alive, peak = set(), [0]
    original = checkpoint.Checkpoint.weight

    def tracked(self, key):
        value = original(self, key)
        alive.add(id(value))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(value, alive.discard, id(value))
        return value

    monkeypatch.setattr(checkpoint.Checkpoint, "weight", tracked)
    stage("analyze_adapter")(adapter=tiny_run / layout.adapter("arithmetic", "qlora"),
                             base=tiny_run / layout.quantized(), analysis=tmp_path / "out",
                             settings=SETTINGS, task="arithmetic", name="qlora")
    assert peak[0] == 1
