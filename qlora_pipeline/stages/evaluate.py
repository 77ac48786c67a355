"""Stages of rules/evaluate.smk: each task's test split as an lm-eval task, and the scoring
of one variant (any kind, any training of the trainings table) on one task."""

from __future__ import annotations

import gc
import logging

from ..core import memory
from ..core.files import write_json, write_jsonl
from ..core.policy import Policy
from ..core.seeding import seed_everything
from ..data.sources import read_split
from ..evaluation import harness, tasks
from . import Input, Output

log = logging.getLogger(__name__)
EVAL_ROW_TOKENS = 256  # a scoring row's length for the memory estimate (the tokenize default)


def eval_task_spec(*, raw: Input, base: Input, spec: Output, format: str, max_gen_tokens: int,
                   task: str, policy: Policy, scoring: dict | None = None) -> None:
    """The task's test split, prompts rendered as in training, as an lm-eval task folder
    (YAML + JSON lines, the data file named relative to the folder)."""
    from transformers import AutoTokenizer

    info = tasks.write_task(task, read_split(raw, "test"), format,
                            AutoTokenizer.from_pretrained(base), spec, max_gen_tokens, scoring)
    write_json(spec / "task.json", info)
    log.info("lm-eval task %s", info)


def evaluate(*, spec: Input, base: Input, results: Output, samples: Output, evaluation: dict,
             seed: int, task: str, variant: str, policy: Policy, quantized: Input = None,
             adapter: Input = None, merged: Input = None) -> dict:
    """One variant scored on the task's own benchmark plus the configured standard ones.
    The model is built from the inputs given (layout.variant_inputs), not from its name."""
    harness.check_benchmarks(evaluation["benchmarks"])  # before any model is loaded
    models = {"base": base, "quantized": quantized, "adapter": adapter, "merged": merged}
    seed_everything(seed)
    names = [tasks.lm_eval_name(task), *evaluation["benchmarks"]]
    _check_memory(models, evaluation, policy)
    model, tokenizer = harness.load_model(policy, **models)
    log.info("evaluating %s on %s", variant, names)
    scores = harness.evaluate(model, tokenizer, spec, names, evaluation, seed, policy)
    del model
    gc.collect()
    write_jsonl(samples, scores.pop("samples"))
    scores.update(variant=variant, task=task)
    write_json(results, scores)
    log.info("results: %s", scores["results"])
    return scores


def _check_memory(models: dict, evaluation: dict, policy: Policy) -> dict:
    """The model as loaded plus one scoring batch: on the CPU the token budget's rows; on
    CUDA one row (lm-eval's "auto" then sizes batches to the memory left)."""
    budget = policy.eval_token_budget(evaluation["batch_size"])
    size = evaluation["batch_size"]
    rows = budget // EVAL_ROW_TOKENS if budget else (size if isinstance(size, int) else 1)
    quantized = models["quantized"] and not models["merged"]
    return memory.check_stage(
        "evaluate", models["merged"] or models["quantized"] or models["base"], policy,
        weights="stored" if quantized else "full", batch=rows, seq=EVAL_ROW_TOKENS,
        remedy="evaluation.batch_size smaller, or a GPU with more memory")
