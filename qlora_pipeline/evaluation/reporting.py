"""The report: every score in one table (scores.csv), per-task tables with the gain over
the base model (report.md), and plots of training curves and scores (PNG)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..layout import COMPRESSED_FROM, SCORED_KINDS, parse_variant
from ..outputs import read_json, read_jsonl
from .tasks import lm_eval_name


def variant_order(variant: str) -> tuple[int, str]:
    """Kinds in pipeline order (base first: gains are shown against it), then by name."""
    return SCORED_KINDS.index(parse_variant(variant)[0]), variant


def score_rows(results_file: str | Path) -> list[dict]:
    """One row per (benchmark, metric) of one variant × task results.json."""
    data = read_json(results_file)
    rows = []
    for benchmark, metrics in data["results"].items():
        name = data["task"] if benchmark == lm_eval_name(data["task"]) else benchmark
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": data["task"], "variant": data["variant"], "benchmark": name,
                         "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def scores(results_files: list) -> pd.DataFrame:
    frame = pd.DataFrame([row for f in results_files for row in score_rows(f)],
                         columns=["task", "variant", "benchmark", "metric", "value", "stderr"])
    return frame.sort_values(["task", "benchmark", "metric", "variant"],
                             key=lambda c: c.map(variant_order) if c.name == "variant" else c,
                             ignore_index=True)


def task_table(frame: pd.DataFrame) -> str:
    """Variants as columns; each tuned variant's cell shows its gain over `base`."""
    wide = frame.pivot_table(index=["benchmark", "metric"], columns="variant", values="value")
    wide = wide[sorted(wide.columns, key=variant_order)]
    lines = ["| benchmark | metric | " + " | ".join(wide.columns) + " |",
             "|---|---|" + "---|" * len(wide.columns)]
    for (benchmark, metric), row in wide.iterrows():
        cells = []
        for variant, value in row.items():
            gain = "" if variant == "base" or "base" not in row else f" ({value - row['base']:+.3f})"
            cells.append(f"{value:.3f}{gain}")
        lines.append(f"| {benchmark} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_rows(adapter_dirs: list) -> pd.DataFrame:
    rows = []
    for directory in map(Path, adapter_dirs):
        summary = read_json(directory / "summary.json")
        rows.append({"task": directory.parent.name, "adapter": directory.name,
                     **{k: summary.get(k) for k in (
                         "steps", "eval_loss_initial", "eval_loss_best", "train_seconds",
                         "tokens_per_second", "peak_memory_mb", "trainable_params",
                         "trainable_pct")}})
    return pd.DataFrame(rows)


def merge_rows(merged_dirs: list) -> pd.DataFrame:
    rows = []
    for directory in map(Path, merged_dirs):
        check = read_json(directory / "merge_check.json")
        for base, gaps in check["checks"].items():
            rows.append({"task": directory.name, "merge_base": base,
                         "chosen": base == check["chosen"], "recovered": check.get("recovered"),
                         "max_gap_vs_unmerged": gaps["vs_unmerged"]["max_abs_logit_gap"],
                         "max_gap_vs_trained": gaps["vs_trained"]["max_abs_logit_gap"],
                         "top1_agreement_vs_trained": gaps["vs_trained"]["top1_agreement"]})
    return pd.DataFrame(rows)


def export_rows(export_dirs: list) -> pd.DataFrame:
    """Per exported GGUF file (stages/export.py): size, time, and both round trips."""
    rows = []
    for directory in map(Path, export_dirs):
        export = read_json(directory / "export.json")
        for gguf_type, found in export["types"].items():
            imported, run = found["importer"], found["llama_cpp"]
            rows.append({
                "task": export["task"], "type": gguf_type, "MiB": found["bytes"] / 2 ** 20,
                "bits_per_param": found["bits_per_param"], "seconds": found["seconds"],
                "importer_weight_error": imported.get("max_weight_rel_error"),
                "llama_cpp_same_answer": run.get("same_answer"),
                "llama_cpp_same_tokens": run.get("same_tokens"),
                "llama_cpp_same_top_token": run.get("same_top_token")})
    return pd.DataFrame(rows)


def compression_rows(compressed_dirs: list, frame: pd.DataFrame) -> pd.DataFrame:
    """Per compressed adapter: size and ranks against the adapter it was cut from, and the two
    adapters' scores on the task's own benchmark side by side."""
    rows = []
    for directory in map(Path, compressed_dirs):
        info = read_json(directory / "compression.json")
        task = info["task"]
        own = frame[(frame["task"] == task) & (frame["benchmark"] == task)]
        scores = {variant: own.loc[own["variant"] == variant, "value"] for variant in
                  (COMPRESSED_FROM, "compressed")}
        after = info["rank_after"]
        rows.append({"task": task, "keep": ", ".join(f"{k} {v}" for k, v in info["keep"].items()),
                     "rank": f"{info['rank_before']} -> {after['min']}..{after['max']} "
                             f"(mean {after['mean']:.2f})",
                     "energy_kept_min": info["energy_kept"]["min"],
                     "parameters": f"{info['parameters']['before']:,} -> "
                                   f"{info['parameters']['after']:,}",
                     "bytes": f"{info['bytes']['before']:,} -> {info['bytes']['after']:,}",
                     "size_ratio": info["parameters"]["ratio"],
                     **{f"score_{variant}": float(values.iloc[0]) if len(values) else None
                        for variant, values in scores.items()}})
    return pd.DataFrame(rows)


def read_metrics(adapter_dir: Path) -> pd.DataFrame:
    path = Path(adapter_dir) / "metrics.jsonl"
    if not path.exists():
        return pd.DataFrame()
    return pd.DataFrame(read_jsonl(path))


def plot_losses(adapter_dirs: list, out_png: Path) -> None:
    """Per task: training and validation loss over the steps, and below it the adapter's mean
    effective rank per module type at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import plot_rank_over_steps

    tasks = sorted({Path(d).parent.name for d in adapter_dirs})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for ax, rank_ax, task in zip(axes[0], axes[1], tasks):
        offset = 0
        for directory in sorted((Path(d) for d in adapter_dirs if Path(d).parent.name == task),
                                key=lambda d: d.name != "qlora"):
            metrics = read_metrics(directory)
            if metrics.empty:
                continue
            for column, style in (("loss", "-"), ("eval_loss", "o--")):
                if column in metrics:
                    points = metrics.dropna(subset=[column])
                    ax.plot(points["step"] + offset, points[column], style,
                            label=f"{directory.name} {'train' if column == 'loss' else 'validation'}")
            plot_rank_over_steps(rank_ax, directory, directory.name, offset)
            offset += int(metrics["step"].max())  # recovery continues after QLoRA
        ax.set(title=task, xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
        rank_ax.set(title=f"{task}: adapter effective rank", xlabel="step",
                    ylabel="mean effective rank")
        if rank_ax.lines:
            rank_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_scores(frame: pd.DataFrame, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(frame.groupby(["task", "benchmark", "metric"]))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4 * max(len(groups), 1), 3.5),
                             squeeze=False)
    for ax, ((task, benchmark, metric), group) in zip(axes[0], groups):
        ax.bar(group["variant"], group["value"],
               yerr=group["stderr"].fillna(0).astype(float), capsize=3)
        top = 1.05 if group["value"].max() <= 1 else 105  # chrF and BLEU are out of 100
        ax.set(title=f"{task}: {benchmark}", ylabel=metric, ylim=(0, top))
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def analysis_sections(analysis_dirs: list) -> str:
    """Every adapter analysis's markdown (analysis/tables.py), task by task."""
    return "\n".join((Path(d) / "analysis.md").read_text(encoding="utf-8")
                     for d in sorted(map(str, analysis_dirs)))


def markdown(frame: pd.DataFrame, training: pd.DataFrame, merges: pd.DataFrame,
             quantization_md: str, analyses_md: str = "",
             compressions: pd.DataFrame | None = None, sweeps_md: str = "",
             combinations_md: str = "", exports: pd.DataFrame | None = None) -> str:
    parts = ["# Fine-tuning report", "",
             "Scores from lm-evaluation-harness on each task's test split; a tuned variant's "
             "cell shows its gain over the full-precision base in parentheses.", ""]
    for task, group in frame.groupby("task"):
        parts += [f"## {task}", "", task_table(group), ""]
    parts += ["## Training", "", training.to_markdown(index=False, floatfmt=".4g"), "",
              "Validation loss before training is the quantized base's (the adapter starts at zero).",
              "", "![losses](loss.png)", "", "## Merge checks", "",
              merges.to_markdown(index=False, floatfmt=".3g"), "",
              "![scores](scores.png)", ""]
    if compressions is not None and not compressions.empty:
        parts += ["## Compression", "",
                  (f"Each {COMPRESSED_FROM} adapter cut to lower ranks (task key `compress`), "
                   "scored as the `compressed` variant on the same quantized base; scores are "
                   "the task's own metric."), "",
                  compressions.to_markdown(index=False, floatfmt=".4g"), ""]
    if exports is not None and not exports.empty:
        parts += ["## GGUF exports", "",
                  ("Each exporting task's merged model as GGUF (task key `export`; "
                   "results/models/gguf/): its size, the largest relative tensor error when "
                   "read back by the importer, and on the task's test prompts in llama.cpp the "
                   "share of the merged model's greedy answers, prompt tokens and top next "
                   "tokens it reproduces (docs/serving.md)."), "",
                  exports.to_markdown(index=False, floatfmt=".4g"), ""]
    if sweeps_md:
        parts += ["## Sweeps", "",
                  "Each point of a task's `sweep:` trained, scored and analysed on its own "
                  "(results/sweeps/): `score` on the variant named under the table, "
                  "`score_<variant>` on the others; loss, time and size are its QLoRA "
                  "training's. sweeps.csv holds the table, sweeps.png the score against each "
                  "swept key.", "", "![sweeps](sweeps.png)", "", sweeps_md]
    if combinations_md:
        parts += ["## Combinations", "", combinations_md]
    if analyses_md:
        parts += ["## Adapters", "",
                  "Each trained adapter's update ΔW, layer by layer (results/analysis/).", "",
                  analyses_md]
    parts += [quantization_md.replace("# Quantization report", "## Quantization", 1)]
    return "\n".join(parts) + "\n"
