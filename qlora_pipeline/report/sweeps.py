"""The report's sweep section: one row per point (score, validation loss, time, size, effective
rank), the score against each swept key, and the point chosen by a stated rule.

The rule (the "one standard error" rule of model selection): among the points whose score is
within one standard error of the best point's, the one with the fewest trainable parameters,
then the best score. A smaller adapter that is not measurably worse is the better choice.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..core.layout import lm_eval_name
from .adapters import mean_effective_rank
from .common import figure
from .scores import numeric_metrics

RULE = ("the smallest adapter (trainable parameters) whose score is within one standard error "
        "of the best point's")
LOG_KEYS = ("lora.r", "lora.alpha", "train.learning_rate")
SUMMARY_KEYS = ("eval_loss_best", "train_seconds", "tokens_per_second", "trainable_params")


def rows(files: list, tables: dict, frames: dict | None = None,
         with_analysis: bool = True) -> pd.DataFrame:
    """One row per point: task, point, the swept values (one column per dotted key), seed,
    metric, score and stderr on the compared variant, the other variants' scores
    (score_<variant>), and its QLoRA training's summary and (with_analysis) analysis figures.
    `tables`: {task: rules/common.smk's sweep_table}, the points' settings from the trainings
    table and every file's path (`files`: the same files, declared so that the job waits)."""
    rows = []
    for task, table in tables.items():
        compared = table["compare"]
        for point, files in table["points"].items():
            scores = {v: own_score(read_json(files["results"][v])) for v in table["variants"]}
            metric, score, stderr = scores[compared]
            summary = read_json(Path(files["adapters"]["qlora"]) / "summary.json")
            values = {key: "+".join(map(str, v)) if isinstance(v, list) else v  # target lists
                      for key, v in files["settings"].items()}
            rows.append({"task": task, "point": point, **values, "seed": files["seed"],
                         "metric": metric, "score": score, "stderr": stderr,
                         **{f"score_{v}": s[1] for v, s in scores.items() if v != compared},
                         **{key: summary.get(key) for key in SUMMARY_KEYS},
                         **({"effective_rank": mean_effective_rank(
                             read_json(Path(files["analysis"]) / "summary.json"))}
                            if with_analysis else {})})
    return pd.DataFrame(rows)


def own_score(data: dict) -> tuple[str, float, float]:
    """The task's own benchmark's first metric, its value and standard error."""
    for found in numeric_metrics(data["results"][lm_eval_name(data["task"])], no_stderr=0.0):
        return found
    raise ValueError(f"results of {data['task']}: no numeric metric for the task's benchmark")


def swept(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if "." in c]


def choose(points: pd.DataFrame) -> pd.Series:
    """The point the rule picks among one task's points (seeds averaged per setting; of the
    chosen setting, its point with the lowest seed)."""
    keys = swept(points)
    if "seed" in points:
        points = points.sort_values("seed", kind="stable")
    settings = points.groupby(keys, dropna=False, sort=False).agg(
        score=("score", "mean"), stderr=("stderr", "mean"),
        trainable_params=("trainable_params", "mean"), point=("point", "first")).reset_index()
    best = settings.loc[settings["score"].idxmax()]
    near = settings[settings["score"] >= best["score"] - best["stderr"]]
    return near.sort_values(["trainable_params", "score"], ascending=[True, False]).iloc[0]


def markdown(frame: pd.DataFrame, tables: dict) -> str:
    parts = ["## Sweeps", "",
             "Each point of a task's `sweep:` trained, scored and analysed as a row of the "
             "trainings table (adapters/<task>/qlora@<training>, eval/<variant>@<point>/): "
             "`score` on the variant named under the table, `score_<variant>` on the others; "
             "loss, time and size are its QLoRA training's. sweeps.csv holds the table, "
             "sweeps.png the score against each swept key.", "", "![sweeps](sweeps.png)", ""]
    for task, points in frame.groupby("task"):
        points = points.dropna(axis=1, how="all")
        chosen, table = choose(points), tables[task]
        shown = points.drop(columns=["task"]).sort_values([*swept(points), "seed"])
        kinds = "qlora and recovered adapters are" if "recovered" in table["variants"] else \
            "qlora adapter is"
        promoted = (f" Promoted (sweep.promote: best): the task's {kinds} this point's."
                    if table.get("promote") else "")
        parts += [f"### {task}", "", shown.to_markdown(index=False, floatfmt=".4g"), "",
                  f"Compared on the {table['compare']} variant. "
                  f"Chosen: **{chosen['point']}** "
                  f"({chosen['score']:.3f}; rule: {RULE}).{promoted}", ""]
    return "\n".join(parts)


def plot(frame: pd.DataFrame, files: list, tables: dict, path: Path) -> None:
    """Per task and swept key: the score against the key's values (mean over the other keys'
    points and seeds; error bars: the spread across seeds where there are several, else the
    score's standard error); log axes for rank, alpha and learning rate."""
    panels = [(task, key) for task, points in frame.groupby("task")
              for key in swept(points.dropna(axis=1, how="all"))]
    with figure(path, 1, len(panels), figsize=(4.5 * len(panels), 3.5)) as (_, axes):
        for ax, (task, key) in zip(axes[0], panels):
            points = frame[frame["task"] == task]
            chosen = points[points["point"] == choose(points.dropna(axis=1, how="all"))["point"]]
            grouped = points.groupby(key)["score"]
            spread = grouped.std().fillna(0) if points["seed"].nunique() > 1 else \
                points.groupby(key)["stderr"].mean()
            means = grouped.mean()
            numeric = pd.api.types.is_numeric_dtype(means.index)
            x = list(means.index) if numeric else list(range(len(means)))
            ax.errorbar(x, means.values, yerr=spread.reindex(means.index).values, marker="o",
                        capsize=3)
            value = chosen[key].iloc[0]
            position = value if numeric else list(means.index).index(value)
            ax.plot([position], chosen["score"].iloc[:1], marker="*", markersize=14, color="C3",
                    linestyle="none", label=f"chosen: {chosen['point'].iloc[0]}")
            ax.legend(loc="lower right", fontsize="small")
            if key in LOG_KEYS and numeric:
                ax.set_xscale("log", base=2 if key != "train.learning_rate" else 10)
                ax.set_xticks(x, [f"{v:g}" for v in x])  # the swept values, not powers of 2
                ax.minorticks_off()
            if not numeric:
                ax.set_xticks(x, [str(v) for v in means.index], rotation=20)
            top = 1.05 if points["score"].max() <= 1 else 105  # chrF and BLEU are out of 100
            ax.set(title=f"{task}: score by {key}", xlabel=key, ylabel=points["metric"].iloc[0],
                   ylim=(0, top))
