"""Running lm-evaluation-harness (its Python API, model type `hf`) on one model variant."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError
from ..runtime import device

log = logging.getLogger(__name__)
VARIANTS = ("base", "base-4bit", "qlora", "recovered", "merged")


def check_benchmarks(names: list[str]) -> None:
    """Refuse unknown lm-eval task names before any model is loaded."""
    if not names:
        return
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)  # indexing lm-eval's own tasks takes seconds
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"evaluation.benchmarks: unknown lm-eval task(s) {unknown}; expected "
                         f"names that lm-eval knows (list them with `lm-eval ls tasks`)")


def load_variant(variant: str, paths: dict):
    """(model, tokenizer) of one variant. `paths`: base, base_4bit, adapter, merged."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..models.quantize import load_full_precision as full
    from ..models.quantize import load_quantized

    if variant == "base":
        model = full(paths["base"])
    elif variant == "base-4bit":
        model = load_quantized(paths["base_4bit"])
    elif variant == "qlora":  # as trained: the 4-bit base with the adapter on top
        model = PeftModel.from_pretrained(load_quantized(paths["base_4bit"]), paths["adapter"])
    elif variant == "recovered":  # as recovered: the full-precision base with the adapter
        model = PeftModel.from_pretrained(full(paths["base"]), paths["adapter"])
    elif variant == "merged":
        model = full(paths["merged"])
    else:
        raise InputError(f"unknown variant '{variant}'; expected one of {', '.join(VARIANTS)}")
    model.eval()
    return model, AutoTokenizer.from_pretrained(paths["base"])


def evaluate(model, tokenizer, task_dir: Path, task_names: list[str], cfg: dict, seed: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    batch_size = cfg["batch_size"]
    if batch_size == "auto" and device() != "cuda":
        batch_size = 8  # lm-eval's auto search probes GPU memory
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(task_dir),
                          include_defaults=len(task_names) > 1)  # only ours: skip the index
    results = lm_eval.simple_evaluate(
        model=lm, tasks=task_names, task_manager=manager, num_fewshot=cfg["num_fewshot"],
        limit=cfg["limit"], log_samples=True, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000,
    )
    return {"results": results["results"], "n-samples": results.get("n-samples"),
            "config": {k: v for k, v in results.get("config", {}).items()
                       if isinstance(v, (str, int, float, bool, type(None)))},
            "samples": [sample_row(name, sample)
                        for name, samples in results.get("samples", {}).items()
                        for sample in samples]}


def sample_row(benchmark: str, sample: dict) -> dict:
    """One scored example, small enough to read: what the model saw, answered and scored."""
    row = {"benchmark": benchmark, "doc_id": sample["doc_id"], "filter": sample["filter"],
           "prompt": sample["arguments"][0][0], "target": sample["target"]}
    responses = sample["filtered_resps"]
    if responses and isinstance(responses[0], str):  # generation
        row["response"] = responses[0]
    else:  # multiple choice: one (log-likelihood, is-greedy) pair per choice
        logliks = [float(r[0]) for r in responses]
        row["loglikelihoods"] = logliks
        row["response"] = max(range(len(logliks)), key=logliks.__getitem__)
    row.update({metric: sample[metric] for metric in sample["metrics"]})
    return row
