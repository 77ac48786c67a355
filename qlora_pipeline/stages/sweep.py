"""Stages of rules/sweep.smk: one sweep point (sweeps.py) trained, scored and analysed as the
task's own QLoRA adapter is, with the point's settings, into results/sweeps/<task>/<point>/."""

from __future__ import annotations

from ..policy import Policy


def train_sweep_point(*, quantized, tokenized, adapter, lora: dict, train: dict, seed: int,
                      settings: dict, checkpoints, policy: Policy) -> dict:
    """train_qlora with the point's lora/train blocks and seed; `settings` (the swept values)
    also go into the provenance, where the report reads them."""
    from ..training.lora import prepare_qlora
    from ..training.train_job import train_adapter

    return train_adapter(
        "train_sweep_point", adapter=adapter, tokenized=tokenized, tokenizer_dir=quantized,
        train=train, seed=seed, checkpoints=checkpoints, policy=policy,
        config={"lora": lora, "train": train, "seed": seed, "sweep": settings},
        inputs={"quantized": quantized, "tokenized": tokenized},
        prepare=lambda: prepare_qlora(quantized, lora, policy,
                                      policy.gradient_checkpointing(train["gradient_checkpointing"])))


def evaluate_sweep_point(*, spec, base, quantized, adapter, results, samples, provenance,
                         evaluation: dict, seed: int, task: str, point: str,
                         policy: Policy) -> dict:
    """The point's adapter on the quantized base, scored like the `qlora` variant."""
    from ..evaluation.score_job import score

    return score("evaluate_sweep_point", spec=spec, base=base, results=results,
                 samples=samples, provenance=provenance, evaluation=evaluation, seed=seed,
                 task=task, variant=f"qlora@{point}", policy=policy, quantized=quantized,
                 adapter=adapter)


def analyze_sweep_point(*, adapter, base, analysis, settings: dict, task: str, point: str,
                        policy: Policy) -> dict:
    """The point's adapter analysed against the quantized base, as analyze_adapter does."""
    from ..analysis.analyze_job import analyze_into

    return analyze_into("analyze_sweep_point", adapter=adapter, base=base, analysis=analysis,
                        settings=settings, task=task, kind=f"qlora@{point}", policy=policy)
