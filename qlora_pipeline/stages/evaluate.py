"""Stages of rules/evaluate.smk: each task's test split as an lm-eval task, and the scoring
of one variant on one task."""

from __future__ import annotations

import gc
import logging

from ..data.sources import read_split
from ..evaluation import harness, tasks
from ..outputs import stage_outputs, write_json, write_jsonl
from ..policy import Policy
from ..runtime import seed_everything

log = logging.getLogger(__name__)


def eval_task_spec(*, raw, base, spec, format: str, max_gen_tokens: int, task: str,
                   policy: Policy) -> None:
    """The task's test split, prompts rendered as in training, as an lm-eval task folder
    (YAML + JSON lines, the data file named relative to the folder)."""
    from transformers import AutoTokenizer

    with stage_outputs("eval_task_spec", {"spec": spec},
                       config={"format": format, "max_gen_tokens": max_gen_tokens},
                       inputs={"raw": raw, "tokenizer": base}, policy=policy) as out:
        info = tasks.write_task(task, read_split(raw, "test"), format,
                                AutoTokenizer.from_pretrained(base), out["spec"], max_gen_tokens)
        write_json(out["spec"] / "task.json", info)
    log.info("lm-eval task %s", info)


def evaluate(*, spec, base, results, samples, provenance, evaluation: dict, seed: int,
             task: str, variant: str, policy: Policy, quantized=None, adapter=None,
             merged=None) -> dict:
    """One variant scored on the task's own benchmark plus the configured standard ones.
    The model is built from the inputs given (layout.variant_inputs), not from its name."""
    harness.check_benchmarks(evaluation["benchmarks"])  # before any model is loaded
    models = {"base": base, "quantized": quantized, "adapter": adapter, "merged": merged}
    outputs = {"results": results, "samples": samples, "provenance": provenance}
    with stage_outputs("evaluate", outputs, config={"variant": variant, "evaluation": evaluation},
                       inputs={"spec": spec, **{k: v for k, v in models.items() if v}},
                       policy=policy, seed=seed) as out:
        seed_everything(seed)
        names = [tasks.lm_eval_name(task), *evaluation["benchmarks"]]
        model, tokenizer = harness.load_model(policy, **models)
        log.info("evaluating %s on %s", variant, names)
        scores = harness.evaluate(model, tokenizer, spec, names, evaluation, seed, policy)
        del model
        gc.collect()
        write_jsonl(out["samples"], scores.pop("samples"))
        scores.update(variant=variant, task=task)
        write_json(out["results"], scores)
    log.info("results: %s", scores["results"])
    return scores
