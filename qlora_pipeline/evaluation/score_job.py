"""One model scored as a stage's output (results.json, samples.jsonl, provenance): what
evaluate and a sweep point's scoring share (stages/evaluate.py, stages/sweep.py), kept outside
the stage modules so that each rule's code digest reaches only what it runs."""

from __future__ import annotations

import gc
import logging

from .. import memory
from ..outputs import stage_outputs, write_json, write_jsonl
from ..policy import Policy
from ..runtime import seed_everything
from . import harness, tasks

log = logging.getLogger(__name__)


def score(stage: str, *, spec, base, results, samples, provenance, evaluation: dict, seed: int,
          task: str, variant: str, policy: Policy, quantized=None, adapter=None,
          merged=None) -> dict:
    """What `evaluate` does, for any stage that scores a model (a sweep point's too)."""
    harness.check_benchmarks(evaluation["benchmarks"])  # before any model is loaded
    models = {"base": base, "quantized": quantized, "adapter": adapter, "merged": merged}
    outputs = {"results": results, "samples": samples, "provenance": provenance}
    with stage_outputs(stage, outputs, config={"variant": variant, "evaluation": evaluation},
                       inputs={"spec": spec, **{k: v for k, v in models.items() if v}},
                       policy=policy, seed=seed) as out:
        seed_everything(seed)
        names = [tasks.lm_eval_name(task), *evaluation["benchmarks"]]
        check_memory(stage, models, evaluation, policy)
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


EVAL_ROW_TOKENS = 256  # a scoring row's length for the estimate (the tokenize default)


def check_memory(stage: str, models: dict, evaluation: dict, policy: Policy) -> dict:
    """The model as loaded plus one scoring batch: on the CPU the token budget's rows; on
    CUDA one row (lm-eval's "auto" then sizes batches to the memory left)."""
    budget = policy.eval_token_budget(evaluation["batch_size"])
    size = evaluation["batch_size"]
    rows = budget // EVAL_ROW_TOKENS if budget else (size if isinstance(size, int) else 1)
    quantized = models["quantized"] and not models["merged"]
    return memory.check_stage(
        stage, models["merged"] or models["quantized"] or models["base"], policy,
        weights="stored" if quantized else "full", batch=rows, seq=EVAL_ROW_TOKENS,
        remedy="evaluation.batch_size smaller, or a GPU with more memory")
