"""The report's Initialisation and rank section: per task, each scored training of the
trainings table with its initialisation (lora.init) and adapter kind (lora.type), its
validation loss before the first step and at its best, its score, time and size, and the
recovered score beside it: recovery is the other remedy for the quantization error.

Only where some training leaves the default (init true, type lora), so a run without one
keeps its report as it was.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from .common import figure, paragraphs
from .sweeps import own_score

DEFAULTS = {"init": True, "type": "lora"}
SUMMARY_KEYS = ("eval_loss_initial", "eval_loss_best", "train_seconds", "trainable_params")


def changed(lora: dict) -> bool:
    """Whether a training's lora block leaves the default initialisation or adapter kind."""
    return any(lora.get(key, default) != default for key, default in DEFAULTS.items())


def init_text(lora: dict) -> str:
    """`true`, `gaussian`, `loftq (iterations 1)`, `pissa (niter 4)`."""
    init = lora.get("init", True)
    settings = {"loftq": "iterations", "pissa": "niter"}
    if init in settings:
        key = settings[init]
        return f"{init} ({key} {lora.get(init, {}).get(key)})"
    return str(init).lower()


def type_text(lora: dict) -> str:
    """`lora`, or `adalora (init_r 12)`: AdaLoRA starts at init_r and prunes down to r."""
    kind = lora.get("type", "lora")
    return f"adalora (init_r {lora['adalora']['init_r']})" if kind == "adalora" else kind


def rows(files: list, tables: dict, frames: dict | None = None) -> pd.DataFrame:
    """One row per scored training: task, training (`own`: the task's own; else its id), init,
    type, r, its QLoRA adapter's summary (SUMMARY_KEYS), metric, score and stderr of its
    QLoRA adapter, and score_recovered/stderr_recovered where it is recovered. `tables`:
    {task: rules/common.smk's init_rank_table}, the settings from the trainings table."""
    found = []
    for task, table in tables.items():
        for training, row in table["rows"].items():
            lora, results = row["lora"], row["results"]
            summary = read_json(Path(row["adapter"]) / "summary.json")
            metric, score, stderr = own_score(read_json(results["qlora"]))
            recovered = own_score(read_json(results["recovered"]))[1:] \
                if "recovered" in results else (None, None)
            found.append({"task": task, "training": training, "init": init_text(lora),
                          "type": type_text(lora), "r": lora["r"],
                          **{key: summary.get(key) for key in SUMMARY_KEYS},
                          "metric": metric, "score": score, "stderr": stderr,
                          "score_recovered": recovered[0], "stderr_recovered": recovered[1]})
    return pd.DataFrame(found)


def markdown(frame: pd.DataFrame, tables: dict) -> str:
    parts = ["## Initialisation and rank",
             "Each scored training of a task (its own and each sweep point) by its "
             "initialisation (lora.init) and adapter kind (lora.type; AdaLoRA prunes from init_r "
             "down to r per adapted matrix, so at equal r the trainings end with equal ranks; "
             "trainable_params counts what trains at the start, AdaLoRA's init_r and E "
             "included). eval_loss_initial is the validation loss before the first step (LoftQ "
             "and PiSSA should start closer to full precision); score ± stderr is the QLoRA "
             "adapter's, score_recovered the recovered adapter's where the training is "
             "recovered: recovery is the other remedy. init_rank.csv holds the table, "
             "init_rank.png the losses and scores.", "![initialisation and rank](init_rank.png)"]
    for task, trainings in frame.groupby("task", sort=False):
        shown = trainings.drop(columns="task").dropna(axis=1, how="all")
        shown = shown.astype(object).where(shown.notna(), None)  # no recovery: left empty
        parts += [f"### {task}", shown.to_markdown(index=False, floatfmt=".4g", missingval="")]
    return paragraphs(*parts)


def plot(frame: pd.DataFrame, files: list, tables: dict, path: Path) -> None:
    """Per task: the validation loss before the first step and at its best, per training; and
    the score ± stderr per training, with the recovered score where there is one."""
    tasks = list(dict.fromkeys(frame["task"]))
    width = max(5, 1.2 * frame.groupby("task").size().max())
    with figure(path, 2, len(tasks), figsize=(width * len(tasks), 7)) as (_, axes):
        for loss_ax, score_ax, task in zip(axes[0], axes[1], tasks):
            rows = frame[frame["task"] == task]
            x = range(len(rows))
            labels = [f"{t}\n{i.split(' ')[0]}, {k.split(' ')[0]}"
                      for t, i, k in zip(rows["training"], rows["init"], rows["type"])]
            for shift, key in ((-0.2, "eval_loss_initial"), (0.2, "eval_loss_best")):
                loss_ax.bar([i + shift for i in x], rows[key].astype(float), width=0.4, label=key)
            loss_ax.set(title=f"{task}: validation loss", ylabel="loss")
            loss_ax.set_xticks(list(x), labels, fontsize=7)
            loss_ax.legend(fontsize="small")
            score_ax.errorbar(list(x), rows["score"], yerr=rows["stderr"], marker="o",
                              linestyle="none", capsize=3, label="qlora")
            if rows["score_recovered"].notna().any():
                score_ax.errorbar(list(x), rows["score_recovered"], yerr=rows["stderr_recovered"],
                                  marker="s", linestyle="none", capsize=3, label="recovered")
            top = 1.05 if rows["score"].max() <= 1 else 105  # chrF and BLEU are out of 100
            score_ax.set(title=f"{task}: score", ylabel=rows["metric"].iloc[0], ylim=(0, top))
            score_ax.set_xticks(list(x), labels, fontsize=7)
            score_ax.legend(fontsize="small")
