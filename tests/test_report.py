"""The report: scores from lm-eval results files, per-task tables with the gain over the
base, training and merge summaries, plots, and Snakemake's HTML report of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import stage
from qlora_pipeline.core.layout import VARIANT_KINDS
from qlora_pipeline.report import merges, scores, training
from qlora_pipeline.report.sections import FILES, SECTIONS

COLUMNS = ["task", "variant", "benchmark", "metric", "value", "stderr"]
# Task t: own benchmark (acc) + arc_easy; task u: own benchmark (exact match) only.
SCORES = {
    ("t", "base"): 0.5, ("t", "quantized"): 0.4, ("t", "qlora"): 0.9, ("t", "recovered"): 0.95,
    ("t", "merged"): 0.85, ("u", "base"): 0.2, ("u", "qlora"): 0.6, ("u", "compressed"): 0.58,
    ("u", "merged"): 0.55,
}


def results_json(task: str, variant: str, value: float) -> dict:
    """A results.json as evaluate_variant writes it (lm-eval's shape)."""
    if task == "t":
        results = {
            "qlora_t": {"name": "qlora_t", "alias": "qlora_t", "sample_len": 40,
                        "acc,none": value, "acc_stderr,none": 0.1},
            "arc_easy": {"alias": "arc_easy", "acc,none": value / 2, "acc_stderr,none": 0.02,
                         "acc_norm,none": value / 3, "acc_norm_stderr,none": "N/A"},
        }
    else:
        results = {"qlora_u": {"alias": "qlora_u", "exact_match,strip": value,
                               "exact_match_stderr,strip": 0.05, "bleu,none": "N/A"}}
    return {"results": results, "n-samples": {}, "config": {"limit": 40},
            "variant": variant, "task": task}


def write_results(root: Path) -> list[Path]:
    files = []
    for (task, variant), value in reversed(list(SCORES.items())):  # not in report order
        path = root / "results/eval" / variant / task / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results_json(task, variant, value)))
        files.append(path)
    return files


def test_score_rows_name_pair_and_skip(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_json("t", "qlora", 0.5)))
    rows = scores.score_rows(path)
    assert rows == [
        {"task": "t", "variant": "qlora", "benchmark": "t", "metric": "acc", "value": 0.5,
         "stderr": 0.1},
        {"task": "t", "variant": "qlora", "benchmark": "arc_easy", "metric": "acc",
         "value": 0.25, "stderr": 0.02},
        {"task": "t", "variant": "qlora", "benchmark": "arc_easy", "metric": "acc_norm",
         "value": pytest.approx(0.5 / 3), "stderr": None},  # "N/A" stderr: none
    ]
    path.write_text(json.dumps(results_json("u", "base", 0.2)))
    assert scores.score_rows(path) == [
        {"task": "u", "variant": "base", "benchmark": "u", "metric": "exact_match",
         "value": 0.2, "stderr": 0.05}]  # the filter name is not part of the metric


def test_scores_table_orders_variants(tmp_path):
    frame = scores.rows(write_results(tmp_path))
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 5 * 3 + 4  # t: 3 metrics x 5 variants; u: 1 metric x 4 variants
    own = frame[(frame.task == "t") & (frame.benchmark == "t")]
    assert list(own.variant) == ["base", "quantized", "qlora", "recovered", "merged"]
    assert list(own.value) == [0.5, 0.4, 0.9, 0.95, 0.85]
    assert list(frame[frame.task == "u"].variant) == ["base", "qlora", "compressed", "merged"]
    assert set(frame.benchmark) == {"t", "arc_easy", "u"}
    assert frame.stderr.isna().sum() == 5  # arc_easy acc_norm for every variant of t
    # Sorted by task, benchmark, metric, then variant order.
    keys = list(zip(frame.task, frame.benchmark, frame.metric))
    assert keys == sorted(keys)


def test_task_table_shows_gain_over_base(tmp_path):
    frame = scores.rows(write_results(tmp_path))
    lines = scores.task_table(frame[frame.task == "t"]).splitlines()
    assert lines[0] == "| benchmark | metric | base | quantized | qlora | recovered | merged |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert ("| t | acc | 0.500 | 0.400 (-0.100) | 0.900 (+0.400) | 0.950 (+0.450) "
            "| 0.850 (+0.350) |") in lines
    assert "| arc_easy | acc | 0.250 | 0.200 (-0.050) | 0.450 (+0.200) |" in lines[2]
    assert len(lines) == 2 + 3  # one row per benchmark x metric

    u = scores.task_table(frame[frame.task == "u"]).splitlines()
    assert u[0] == "| benchmark | metric | base | qlora | compressed | merged |"
    assert u[2] == ("| u | exact_match | 0.200 | 0.600 (+0.400) | 0.580 (+0.380) "
                    "| 0.550 (+0.350) |")

    no_base = scores.task_table(frame[(frame.task == "u") & (frame.variant != "base")])
    assert "| u | exact_match | 0.600 | 0.580 | 0.550 |" in no_base and "(" not in no_base


def write_analysis(folder: Path, task: str, kind: str) -> Path:
    """A handmade analyze_adapter output: three layers of q_proj and v_proj, r = 2."""
    folder.mkdir(parents=True)
    (folder / "analysis.md").write_text(f"### {task}: {kind} adapter\n\nuniform r = 2\n")
    layers = {f"model.layers.{i}.self_attn.{m}.weight": {
        "rank": 2, "singular_values": [1.0 + i, 0.5], "fro": 1.1 + i, "spectral": 1.0 + i,
        "stable_rank": 1.2, "effective_rank": 1.8, "rank_90": 1, "rank_99": 2,
        "relative_norm": 0.01 * (i + 1), "intruders": None}
        for i in range(3) for m in ("q_proj", "v_proj")}
    (folder / "layers.json").write_text(json.dumps(layers))
    (folder / "summary.json").write_text(json.dumps({
        "task": task, "kind": kind, "r": 2, "layers_analyzed": 6,
        "recommendation": {"uniform": 1},
        "summary": {"spectra": {"q_proj": [1.0, 0.4], "v_proj": [1.0, 0.3]},
                    "by_module": {m: {"layers": 3, "effective_rank": 1.8}
                                  for m in ("q_proj", "v_proj")}}}))
    return folder


def write_compression(folder: Path, task: str) -> Path:
    """A handmade compress_adapter summary (the adapter files themselves are not read)."""
    folder.mkdir(parents=True)
    (folder / "compression.json").write_text(json.dumps({
        "task": task, "keep": {"energy": 0.9}, "layers": 6, "rank_before": 8,
        "rank_after": {"min": 1, "max": 3, "mean": 2.5}, "energy_kept": {"min": 0.91},
        "parameters": {"before": 12288, "after": 3840, "ratio": 0.3125},
        "bytes": {"before": 50000, "after": 16000}}))
    return folder


def make_run(root: Path) -> dict:
    """Handmade inputs of the report stage, laid out as the pipeline lays them out."""
    files = write_results(root)
    adapters, analyses = [], []
    for task, kinds in (("t", ("qlora", "recovered")), ("u", ("qlora",))):
        for kind in kinds:
            directory = root / "results/adapters" / task / kind
            directory.mkdir(parents=True)
            steps = 6 if kind == "qlora" else 3
            (directory / "summary.json").write_text(json.dumps({
                "steps": steps, "eval_loss_initial": 3.5, "eval_loss_best": 1.25,
                "train_seconds": 12.0, "tokens_per_second": 480.0, "peak_memory_mb": 900.0,
                "trainable_params": 4096, "trainable_pct": 1.5}))
            lines = []
            for step in range(1, steps + 1):
                lines.append({"step": step, "epoch": step / steps, "loss": 4.0 - step * 0.3,
                              "learning_rate": 1e-3})
                if step % 3 == 0:
                    lines.append({"step": step, "epoch": step / steps, "eval_loss": 3.0 - step * 0.2})
            lines.append({"step": steps, "epoch": 1.0, "train_runtime": 12.0})
            (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            adapters.append(directory)
            analyses.append(write_analysis(root / "results/analysis" / task / kind, task, kind))
    merged = []
    for task in ("t", "u"):
        directory = root / "results/models/merged" / task
        directory.mkdir(parents=True)
        gaps = {"max_abs_logit_gap": 0.002, "mean_abs_logit_gap": 0.0004, "top1_agreement": 1.0}
        checks = {"dequantized": {"vs_unmerged": gaps,
                                  "vs_trained": {**gaps, "max_abs_logit_gap": 0.03,
                                                      "top1_agreement": 0.875}},
                  "full": {"vs_unmerged": gaps,
                           "vs_trained": {**gaps, "max_abs_logit_gap": 0.4,
                                               "top1_agreement": 0.75}}}
        chosen = "full" if task == "t" else "dequantized"
        (directory / "merge_check.json").write_text(json.dumps({
            "chosen": chosen, "recovered": task == "t", "examples": 8, "checks": checks}))
        merged.append(directory)
    quantization = write_quantization(root)
    compressed = write_compression(root / "results/adapters/u/compressed", "u")
    sections = {"scores": files, "training": adapters, "merges": merged,
                "compression": [compressed], "adapters": analyses, "quantization": quantization}
    return {"sections": sections, "outputs": report_outputs(root, sections)}


def write_quantization(root: Path) -> list[Path]:
    """The quantization report's files, as the quantization_report stage writes them."""
    folder = root / "results/quantization"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"summary": {"method": "nf4"}}))
    (folder / "report.md").write_text("# Quantization report\n\n| layer | error |\n|---|---|\n"
                                      "| q_proj | 0.1 |\n")
    return [folder / "report.json", folder / "report.md"]


def report_outputs(root: Path, sections: dict) -> dict[str, Path]:
    """The report's files for these sections (as rules/common.smk's report_files names them)."""
    from qlora_pipeline.report.sections import outputs

    out = root / "results/report"
    return {**{name: out / FILES[name][0] for name in outputs(sections)},
            "provenance": out / "provenance.json"}


def build(run: dict, tables: dict | None = None) -> dict[str, Path]:
    """The report stage on a handmade run, as its rule calls it."""
    files = [f for fs in run["sections"].values() for f in fs]
    stage("report")(files=files, sections=run["sections"], tables=tables or {}, **run["outputs"])
    return run["outputs"]


def test_build_report(tmp_path):
    import matplotlib.image

    outputs = build(make_run(tmp_path))

    scores = pd.read_csv(outputs["scores"])
    assert list(scores.columns) == COLUMNS
    assert len(scores) == 19
    row = scores[(scores.task == "t") & (scores.variant == "qlora") & (scores.benchmark == "t")]
    assert row[["metric", "value", "stderr"]].values.tolist() == [["acc", 0.9, 0.1]]

    text = outputs["markdown"].read_text()
    sections = [line for line in text.splitlines() if line.startswith("#")]
    assert sections == ["# Fine-tuning report", "## t", "## u", "## Training",
                        "## Merge checks", "## Compression", "## Adapters", "### t: qlora adapter",
                        "### t: recovered adapter", "### u: qlora adapter", "## Quantization"]
    t_part = text.split("## t\n", 1)[1].split("## u\n", 1)[0]
    assert "| t | acc | 0.500 | 0.400 (-0.100) | 0.900 (+0.400)" in t_part
    assert "| arc_easy | acc_norm |" in t_part
    u_part = text.split("## u\n", 1)[1].split("## Training", 1)[0]
    assert "| u | exact_match | 0.200 | 0.600 (+0.400) | 0.580 (+0.380) | 0.550 (+0.350) |" \
        in u_part
    compression = text.split("## Compression", 1)[1].split("## Adapters", 1)[0]
    row, = [line for line in compression.splitlines() if line.startswith("| u ")]
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "u", "energy 0.9", "8 -> 1..3 (mean 2.50)", "0.91", "12,288 -> 3,840",
        "50,000 -> 16,000", "0.3125", "0.6", "0.58"]

    training = text.split("## Training", 1)[1].split("## Merge checks", 1)[0]
    table = [line for line in training.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one row per adapter
    assert "eval_loss_best" in table[0] and "trainable_pct" in table[0]
    assert any("recovered" in line and "| t " in line for line in table)
    assert "![losses](loss.png)" in training

    merges = text.split("## Merge checks", 1)[1].split("## Compression", 1)[0]
    table = [line for line in merges.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # two merge bases checked per task
    assert "max_gap_vs_trained" in table[0]
    assert any("0.875" in line and "dequantized" in line for line in table)
    assert "| q_proj | 0.1 |" in text.split("## Quantization", 1)[1]
    assert "# Quantization report" not in text

    # One panel per task (losses), one per task x benchmark x metric (scores: 4 here),
    # each 5 and 4 inches wide at 100 dpi.
    for key, width in (("loss_plot", 2 * 5 * 100), ("scores_plot", 4 * 4 * 100)):
        png = outputs[key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[1] == width
    assert not list(outputs["scores"].parent.glob(".*tmp-*"))
    provenance = json.loads(outputs["provenance"].read_text())
    assert provenance["stage"] == "report" and provenance["code"]


def test_gguf_exports_section(tmp_path):
    """With exports, one row per GGUF file, after Compression: size, both round trips."""
    run = make_run(tmp_path)
    folder = tmp_path / "results/models/gguf/u"
    folder.mkdir(parents=True)
    checks = {"importer": {"checked": True, "max_weight_rel_error": 2.1e-4},
              "llama_cpp": {"checked": True, "same_answer": 0.975, "same_tokens": 1.0,
                            "same_top_token": 1.0}}
    (folder / "export.json").write_text(json.dumps({"task": "u", "types": {
        "f16": {"bytes": 3 * 2 ** 20, "bits_per_param": 16.1, "seconds": 2.5, **checks},
        "q8_0": {"bytes": 2 ** 20, "bits_per_param": 8.6, "seconds": 2.0, **checks,
                 "llama_cpp": {"checked": False, "why": "export.check.llama_cpp: false"}}}}))
    run["sections"]["exports"] = [folder]
    outputs = build(run)
    text = outputs["markdown"].read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[sections.index("## Compression") + 1] == "## GGUF exports"
    part = text.split("## GGUF exports", 1)[1].split("## Adapters", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()
            if line.startswith("| u ")]
    assert rows == [["u", "f16", "3", "16.1", "2.5", "0.00021", "0.975", "1", "1"],
                    ["u", "q8_0", "1", "8.6", "2", "0.00021", "nan", "nan", "nan"]]
    recorded = json.loads(outputs["provenance"].read_text())
    assert {"path": str(folder), "sha256": recorded["inputs"]["files"][-1]["sha256"]} in \
        recorded["inputs"]["files"]
    assert recorded["params"]["sections"]["exports"] == [str(folder)]


def test_merge_and_training_rows(tmp_path):
    run = make_run(tmp_path)["sections"]
    found = merges.rows(run["merges"])
    chosen = found[found.chosen]
    assert chosen[["task", "merge_base"]].values.tolist() == [["t", "full"], ["u", "dequantized"]]
    assert list(chosen.recovered) == [True, False]
    rows = training.rows(run["training"])
    assert rows[["task", "adapter", "steps"]].values.tolist() == [
        ["t", "qlora", 6], ["t", "recovered", 3], ["u", "qlora", 6]]
    assert "starts at zero)." in training.markdown(rows)
    (Path(run["training"][-1]) / "initial").mkdir()  # a LoftQ/PiSSA adapter's initial one
    assert "PiSSA adapter's is its base's with the initial adapter" in \
        training.markdown(training.rows(run["training"]))


# ---- the report rule and `snakemake --report` ---------------------------------------------

def snakemake_inputs(workdir: Path) -> None:
    """Handmade inputs of the report rule for the tiny config's tasks and variants."""
    from conftest import TINY_TASKS

    from qlora_pipeline.core.files import write_json

    results = workdir / "results"
    gaps = {"max_abs_logit_gap": 0.01, "mean_abs_logit_gap": 0.001, "top1_agreement": 1.0}
    for task, cfg in TINY_TASKS.items():
        recovery = cfg.get("recovery", {}).get("enabled", False)
        variants = [v for v in VARIANT_KINDS if (v != "recovered" or recovery)
                    and (v != "compressed" or cfg.get("compress"))]
        for i, variant in enumerate(variants):
            write_json(results / "eval" / variant / task / "results.json", {
                "results": {f"qlora_{task}": {"acc,none": 0.1 * (i + 1),
                                              "acc_stderr,none": 0.05}},
                "variant": variant, "task": task})
        for kind in ("qlora", "recovered") if recovery else ("qlora",):
            write_json(results / "adapters" / task / kind / "summary.json", {"steps": 2})
            (results / "adapters" / task / kind / "metrics.jsonl").write_text(
                '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n')
            write_analysis(results / "analysis" / task / kind, task, kind)
        if cfg.get("compress"):
            write_compression(results / "adapters" / task / "compressed", task)
        for rank in cfg.get("sweep", {}).get("lora.r", []):
            write_sweep_point(workdir, task, f"r{rank}", rank)
        write_json(results / "models/merged" / task / "merge_check.json", {
            "chosen": "dequantized", "recovered": recovery, "examples": 2,
            "checks": {"dequantized": {"vs_unmerged": gaps, "vs_trained": gaps}}})
    write_combination(workdir)
    write_quantization(workdir)


# The tiny config's combination `both`: the other task's adapter and the combination on each
# task (the 4-bit base scores 0.2 and each own adapter 0.3 above).
MATRIX = {("arithmetic", "qlora+topic"): 0.25, ("topic", "qlora+arithmetic"): 0.15,
          ("arithmetic", "combined+both"): 0.28, ("topic", "combined+both"): 0.22}


def write_combination(workdir: Path) -> None:
    """Handmade outputs of the combination's jobs, as the report reads them."""
    from qlora_pipeline.core import layout
    from qlora_pipeline.core.files import write_json

    for (task, variant), value in MATRIX.items():
        write_json(workdir / layout.evaluation(variant, task)["results"], {
            "results": {f"qlora_{task}": {"acc,none": value, "acc_stderr,none": 0.05}},
            "variant": variant, "task": task})
    write_json(workdir / layout.combination("both") / "combination.json", {
        "method": "sum", "rank": {"min": 16, "max": 16},
        "parameters": {"sources": {"arithmetic": 100, "topic": 100}, "combined": 200},
        "relative_error": {"max": 1e-8}, "from_sum": {"mean": 1e-8},
        "overlap": [{"pair": "arithmetic|topic", "layer": f"model.layers.{i}.self_attn.{m}",
                     "overlap": 0.1 * (i + 1), "max_cosine": 0.5, "random": 0.05}
                    for i in range(2) for m in ("q_proj", "v_proj")]})


def write_sweep_point(workdir: Path, task: str, point: str, rank: int) -> None:
    """Handmade outputs of one sweep point's three jobs, as the report reads them."""
    from qlora_pipeline.core import layout
    from qlora_pipeline.core.files import write_json

    adapter = workdir / layout.adapter(task, f"qlora@{point}")
    write_json(adapter / "summary.json", {"eval_loss_best": 1.0, "train_seconds": 2.0,
                                          "tokens_per_second": 100.0,
                                          "trainable_params": 1000 * rank})
    write_json(workdir / layout.evaluation(f"qlora@{point}", task)["results"], {
        "results": {f"qlora_{task}": {"acc,none": 0.1 * rank, "acc_stderr,none": 0.05}},
        "variant": f"qlora@{point}", "task": task})
    write_json(workdir / layout.analysis(task, f"qlora@{point}") / "summary.json", {
        "summary": {"by_module": {"q_proj": {"effective_rank": 1.0, "layers": 2}}}})


def test_report_rule_and_html_report(workdir):
    """The report rule alone (upstream outputs given), then `snakemake --report`. topic's rank
    sweep pairs r 2 with a Gaussian init, so topic gets the Initialisation and rank section."""
    from conftest import TINY_TASKS, snakemake, write_yaml

    snakemake_inputs(workdir)
    sweep = {**TINY_TASKS["topic"]["sweep"], "lora.init": [True, "gaussian"], "mode": "zip"}
    write_yaml(workdir / "config/tasks/topic.yaml", {**TINY_TASKS["topic"], "sweep": sweep})
    for point, rank in (("inittrue-r1", 1), ("initgaussian-r2", 2)):
        write_sweep_point(workdir, "topic", point, rank)
    only_report = ("--allowed-rules", "report")
    snakemake(workdir, *only_report)
    out = workdir / "results/report"
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == COLUMNS
    assert set(scores.task) == set(TINY_TASKS)
    # in pipeline order: another task's adapter beside the own, the combination last
    assert list(scores[scores.task == "arithmetic"].variant) == [
        "base", "quantized", "qlora", "qlora+topic", "recovered", "merged", "combined+both"]
    assert list(scores[scores.task == "topic"].variant) == [
        "base", "quantized", "qlora", "qlora+arithmetic", "compressed", "merged",
        "combined+both"]
    assert all(f"## {task}" in (out / "report.md").read_text() for task in TINY_TASKS)
    assert (out / "scores.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    sweeps = pd.read_csv(out / "sweeps.csv")  # topic's points, r 1 and 2, in id order
    assert list(sweeps["point"]) == ["initgaussian-r2", "inittrue-r1"]
    assert list(sweeps["score"]) == [0.2, 0.1]
    assert "Chosen: **initgaussian-r2** (0.200;" in (out / "report.md").read_text()
    # every training of topic (its own first) from the trainings table; arithmetic keeps the
    # defaults, so it has no row; no AdaLoRA training, so no Rank selection
    trainings = pd.read_csv(out / "init_rank.csv", keep_default_na=False)
    assert trainings[["task", "training", "init", "r"]].values.tolist() == [
        ["topic", "own", "true", 8], ["topic", "initgaussian-r2", "gaussian", 2],
        ["topic", "inittrue-r1", "true", 1]]
    assert trainings["score"].tolist() == pytest.approx([0.3, 0.2, 0.1])
    headings = [line for line in (out / "report.md").read_text().splitlines()
                if line.startswith("## ")]
    assert headings[headings.index("## Sweeps") + 1] == "## Initialisation and rank"
    assert not (out / "rank_selection.csv").exists()
    # the combination matrix: gains over the 4-bit base (0.2), retention against the own 0.3
    text = (out / "report.md").read_text()
    assert ("| arithmetic | acc | 0.200 | 0.300 (+0.100) | 0.250 (+0.050) | 0.280 (+0.080, 80%) |"
            in text)
    assert "| topic | acc | 0.200 | 0.150 (-0.050) | 0.300 (+0.100) | 0.220 (+0.020, 20%) |" in text
    matrix = pd.read_csv(out / "combinations.csv")
    assert matrix.loc[matrix.adapter == "both", "retention"].tolist() == pytest.approx([0.8, 0.2])
    assert (out / "overlap.png").stat().st_size > 0

    html = workdir / "report.html"
    snakemake(workdir, *only_report, "--report", str(html))
    text = html.read_text(encoding="utf-8", errors="replace")
    for name in ("scores.csv", "report.md", "scores.png", "loss.png", "combinations.csv",
                 "overlap.png", "init_rank.csv", "init_rank.png"):
        assert name in text, name


def test_html_report_of_the_tiny_run(tiny_run, tmp_path):
    """`snakemake --report` on the session's full tiny run (shared with other test files)."""
    from conftest import TINY_TASKS, snakemake

    scores = pd.read_csv(tiny_run / "results/report/scores.csv")
    expected = {(task, variant) for task, cfg in TINY_TASKS.items()
                for variant in VARIANT_KINDS
                if (variant != "recovered" or cfg.get("recovery", {}).get("enabled"))
                and (variant != "compressed" or cfg.get("compress"))}
    assert set(zip(scores.task, scores.variant)) == expected | set(MATRIX)
    assert set(scores.benchmark) == set(TINY_TASKS)
    assert scores.value.between(0, 1).all()

    html = tmp_path / "report.html"
    snakemake(tiny_run, "--report", str(html))
    text = html.read_text(encoding="utf-8", errors="replace")
    for name in ("scores.csv", "report.md", "scores.png", "loss.png", "combinations.csv",
                 "overlap.png"):
        assert name in text, name
    assert "init_rank.csv" not in text  # the tiny run trains with the default init only


def test_make_demo_ends_in_one_screen(tiny_run):
    """What `make demo` prints after Snakemake (report/screen.py): every task's score table and
    the training table, then where the report, HTML, plots, GGUF files and chat are; at most
    60 lines, the rest left in report.md."""
    from conftest import TINY_TASKS

    from qlora_pipeline.report import screen

    run = tiny_run / "results"
    lines = screen.screen(run).splitlines()
    assert len(lines) <= screen.SCREEN_LINES
    headings = [line for line in lines if line.startswith("## ")]
    assert sorted(headings[:-1]) == [f"## {task}" for task in sorted(TINY_TASKS)]
    assert headings[-1] == "## Training"
    trained = pd.read_csv(run / "report/scores.csv").task.unique()
    assert {line.split("|")[1].strip() for line in lines if line.startswith("| ")} >= \
        {"benchmark", "task", *trained}  # score tables' and the training table's rows
    labels = [line.split(":")[0] for line in lines if not line.startswith(("|", "#")) and line]
    assert labels[:3] == ["Report", "HTML", "Plots"] and labels[-1] == "Chat"
    assert str(run / "report/report.md") in lines[-len(labels)]
    assert "scores.png" in lines[-len(labels) + 2]
    assert not any(line.startswith("![") for line in lines)


def test_a_long_report_is_cut_to_one_screen(tmp_path):
    from qlora_pipeline.report import screen

    report = tmp_path / "report"
    report.mkdir()
    table = "| benchmark | metric | base |\n|---|---|---|\n| t | acc | 0.5 |\n"
    tasks = "".join(f"## task{i}\n\n{table}\n" for i in range(30))
    (report / "report.md").write_text(f"# Fine-tuning report\n\nIntro.\n\n{tasks}"
                                      f"## Training\n\n{table}\n## Adapters\n\n{table}")
    lines = screen.screen(tmp_path).splitlines()
    assert len(lines) == screen.SCREEN_LINES
    assert lines[0] == "## task0" and f"... (more in {report / 'report.md'})" in lines
    assert lines[-1].startswith("Chat:") and "## Adapters" not in lines
    assert screen.main([str(tmp_path / "nowhere")]) == 2
