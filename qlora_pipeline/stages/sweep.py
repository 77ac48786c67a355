"""Stages of rules/sweep.smk: one sweep point (sweeps.py) trained, recovered, scored and
analysed as the task's own adapters are, with the point's settings, into
results/sweeps/<task>/<point>/; and the promotion of the chosen point to the task's adapter."""

from __future__ import annotations

import logging
import shutil

from .. import sweeps
from ..outputs import stage_outputs
from ..policy import Policy

log = logging.getLogger(__name__)


def train_sweep_point(*, quantized, tokenized, adapter, lora: dict, train: dict, seed: int,
                      settings: dict, checkpoints, tensorboard=None, policy: Policy) -> dict:
    """train_qlora with the point's lora/train blocks and seed; `settings` (the swept values)
    also go into the provenance, where the report reads them."""
    from ..training.train_job import train_qlora_adapter

    return train_qlora_adapter(
        "train_sweep_point", quantized=quantized, tokenized=tokenized, adapter=adapter,
        lora=lora, train=train, seed=seed, checkpoints=checkpoints, tensorboard=tensorboard,
        policy=policy, recorded={"sweep": settings})


def recover_sweep_point(*, base, qlora, tokenized, adapter, train: dict, seed: int,
                        settings: dict, checkpoints, tensorboard=None, policy: Policy) -> dict:
    """recover, on the point's QLoRA adapter with its settings; `settings` go into the
    provenance, where the report reads them."""
    from ..training.train_job import recover_adapter

    return recover_adapter(
        "recover_sweep_point", base=base, qlora=qlora, tokenized=tokenized, adapter=adapter,
        train=train, seed=seed, checkpoints=checkpoints, tensorboard=tensorboard,
        policy=policy, recorded={"sweep": settings})


def evaluate_sweep_point(*, spec, base, adapter, results, samples, provenance, evaluation: dict,
                         seed: int, task: str, point: str, variant: str, policy: Policy,
                         quantized=None) -> dict:
    """The point's adapter scored as `variant` (qlora: on the quantized base; recovered: on
    the full one), as the task's own variant is."""
    from ..evaluation.score_job import score

    return score("evaluate_sweep_point", spec=spec, base=base, results=results,
                 samples=samples, provenance=provenance, evaluation=evaluation, seed=seed,
                 task=task, variant=f"{variant}@{point}", policy=policy, quantized=quantized,
                 adapter=adapter)


def analyze_sweep_point(*, adapter, base, analysis, settings: dict, task: str, point: str,
                        policy: Policy) -> dict:
    """The point's adapter analysed against the quantized base, as analyze_adapter does."""
    from ..analysis.analyze_job import analyze_into

    return analyze_into("analyze_sweep_point", adapter=adapter, base=base, analysis=analysis,
                        settings=settings, task=task, kind=f"qlora@{point}", policy=policy)


def promote_sweep_point(*, results: list, trainings: list, adapters: list, adapter, table: dict,
                        task: str, kind: str, policy: Policy) -> str:
    """The point the report's rule chooses, its `kind` adapter copied as the task's own; its
    provenance.json records the point, the rule, every candidate's score and the trained
    adapter's own provenance (kept as trained_provenance.json)."""
    from ..evaluation import sweep_report

    del results, trainings, adapters  # declared inputs (they order the job); read by path
    variant = sweeps.selection_variant(table)
    compared = {**table, "variants": [variant]}  # only the scores the job waits for
    points = sweep_report.points_table({task: compared}, with_analysis=False)
    chosen = sweep_report.choose(points)
    source = table["points"][chosen["point"]]["adapters"][kind]
    candidates = points[["point", "score", "stderr", "trainable_params"]].to_dict("records")
    config = {"point": chosen["point"], "variant": variant, "rule": sweep_report.RULE,
              "candidates": candidates, "metric": points["metric"].iloc[0]}
    with stage_outputs("promote_sweep_point", {"adapter": adapter}, config=config,
                       inputs={"adapter": source}, policy=policy) as out:
        shutil.copytree(source, out["adapter"], dirs_exist_ok=True)
        (out["adapter"] / "provenance.json").rename(out["adapter"] / "trained_provenance.json")
    log.info("%s: promoted sweep point %s (%s %.4f) as its %s adapter", task, chosen["point"],
             config["metric"], chosen["score"], kind)
    return chosen["point"]
