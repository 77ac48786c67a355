"""Stages of rules/evaluate.smk: each task's test split as an lm-eval task, and the scoring
of one variant on one task."""

from __future__ import annotations

import logging

from ..data.sources import read_split
from ..evaluation import tasks
from ..evaluation.score_job import score
from ..outputs import stage_outputs, write_json
from ..policy import Policy

log = logging.getLogger(__name__)


def eval_task_spec(*, raw, base, spec, format: str, max_gen_tokens: int, task: str,
                   policy: Policy, scoring: dict | None = None) -> None:
    """The task's test split, prompts rendered as in training, as an lm-eval task folder
    (YAML + JSON lines, the data file named relative to the folder)."""
    from transformers import AutoTokenizer

    with stage_outputs("eval_task_spec", {"spec": spec},
                       config={"format": format, "max_gen_tokens": max_gen_tokens,
                               "scoring": scoring},
                       inputs={"raw": raw, "tokenizer": base}, policy=policy) as out:
        info = tasks.write_task(task, read_split(raw, "test"), format,
                                AutoTokenizer.from_pretrained(base), out["spec"], max_gen_tokens,
                                scoring)
        write_json(out["spec"] / "task.json", info)
    log.info("lm-eval task %s", info)


def evaluate(*, spec, base, results, samples, provenance, evaluation: dict, seed: int,
             task: str, variant: str, policy: Policy, quantized=None, adapter=None,
             merged=None) -> dict:
    """One variant scored on the task's own benchmark plus the configured standard ones.
    The model is built from the inputs given (layout.variant_inputs), not from its name."""
    return score("evaluate", spec=spec, base=base, results=results, samples=samples,
                 provenance=provenance, evaluation=evaluation, seed=seed, task=task,
                 variant=variant, policy=policy, quantized=quantized, adapter=adapter,
                 merged=merged)
