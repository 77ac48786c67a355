"""Running lm-evaluation-harness (its Python API, model type `hf`) on one model variant."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import yaml

from ..core.errors import InputError
from ..core.policy import Policy

log = logging.getLogger(__name__)


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


def load_model(policy: Policy, base, quantized=None, adapter=None, merged=None):
    """(model, tokenizer) from what an evaluation was given (layout.variant_inputs): a merged
    model (given alone: variant_inputs names no quantized base or adapter beside it); else the
    quantized or the full-precision base, with the adapter on top if there is one. The base
    always gives the tokenizer."""
    from transformers import AutoTokenizer

    from ..models import adapter_file
    from ..models.quantization import load_full_precision, load_quantized

    model = load_quantized(quantized, policy) if quantized \
        else load_full_precision(merged or base, policy, offload=True)
    if adapter:
        adapter_file.check(adapter, base)  # one line, not PEFT's traceback, for a bad folder
        # Only here: peft, with the bitsandbytes it imports, takes 1.5-2 s to import on a
        # 2-core CPU that scoring a base, quantized or merged model would spend for nothing.
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, AutoTokenizer.from_pretrained(base)


def located_spec(spec_dir: Path, into: Path) -> Path:
    """A copy of the task's lm-eval YAML files in `into`, with their data files (stored
    relative to the spec folder, so that results/ can move) made absolute for lm-eval."""
    for source in Path(spec_dir).glob("*.yaml"):
        spec = yaml.safe_load(source.read_text(encoding="utf-8"))
        files = spec.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((Path(spec_dir) / name).resolve())
        (into / source.name).write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True),
                                        encoding="utf-8")
    return into


def evaluate(model, tokenizer, spec_dir: Path, task_names: list[str], cfg: dict, seed: int,
             policy: Policy) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .shared_context import SharedContextLM

    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer,
                         batch_size=policy.eval_batch_size(cfg["batch_size"]),
                         token_budget=policy.eval_token_budget(cfg["batch_size"]))
    with tempfile.TemporaryDirectory(prefix="lm-eval-spec-") as located:
        manager = TaskManager(include_path=str(located_spec(spec_dir, Path(located))),
                              include_defaults=len(task_names) > 1)  # only ours: skip the index
        results = lm_eval.simple_evaluate(
            model=lm, tasks=task_names, task_manager=manager, num_fewshot=cfg["num_fewshot"],
            limit=cfg["limit"], log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000,
        )
    return {"results": results["results"], "n-samples": results.get("n-samples"),
            "scoring": lm.scoring,  # shared-context log-likelihoods or lm-eval's; None: none
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
