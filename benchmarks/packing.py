"""packing: effective (non-padding) tokens per second of padding-free packing against padded
batches and padded batches grouped by length; goal: packed ≥ 1.5 × padded.

Data: the builtin `list_sum` generator (chat examples of ~25 to ~430 tokens, most short),
fetched and tokenized by the pipeline's own stages, once with `tokenize.packing: false` and
once with `true` (whole examples joined into rows of at most max_length tokens, each example
attending only to itself). Each mode trains the saved 4-bit base with the pipeline's training
loop (prepare_qlora + loop.train, the task defaults of config/config.yaml) for a fixed number
of steps, in its own process at the same thread count; the modes alternate across repeats.
`grouped` is `padded` with `train.group_by_length` (Trainer's length-grouped sampler).

Effective tokens: the tokens of the examples in each measured step's batch, counted where the
pipeline's collator builds the batch; the figure is their sum over the measured steps divided
by the steps' summed wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

from benchmarks import support
from qlora_pipeline.core import layout

GOAL = 1.5
MODES = ("packed", "padded", "grouped")
INPUTS = [layout.base(), layout.quantized()]
SETTINGS_TASK = "topic"  # a task on the config's defaults: LoRA r 8 on q_proj, v_proj
MAX_LENGTH = 512
BATCH = 4  # rows per step, in every mode
DATASET = {"name": "list_sum", "seed": 3, "system_prompt": "You are a calculator."}
FULL = {"examples": 600, "repeats": 2, "steps": 8, "warmup": 2, "one_process": False}
SMOKE = {"examples": 120, "repeats": 1, "steps": 3, "warmup": 0, "one_process": True}


def run(smoke: bool, threads: list[int] | None = None) -> dict:
    plan = SMOKE if smoke else FULL
    if smoke:
        base, quantized, threads = support.tiny_base(), support.tiny_quantized(), 1
    else:
        base, quantized = support.REPO / layout.base(), support.REPO / layout.quantized()
        threads = max(threads or [support.default_threads()])
    with tempfile.TemporaryDirectory() as tmp:
        args = prepared(Path(tmp), base, quantized, plan)
        runs = measure(args, plan, threads)
    return summary(runs, plan, threads)


def prepared(root: Path, base: Path, quantized: Path, plan: dict) -> list[str]:
    """Worker arguments: the two tokenized datasets and the training settings."""
    dataset = support.dataset_cfg(DATASET["name"], plan["examples"], DATASET["seed"],
                                  system_prompt=DATASET["system_prompt"])
    data = {packed: support.tokenized(root, base, dataset, {
        "max_length": MAX_LENGTH, "train_on_prompt": False, "packing": packed})
        for packed in (False, True)}
    settings = support.task_settings(SETTINGS_TASK)
    train = {**support.bench_train_cfg(settings["train"], plan["steps"]), "batch_size": BATCH,
             "gradient_accumulation": 1, "max_eval_examples": BATCH}
    path = support.write_settings(root / "settings.json", {"lora": settings["lora"],
                                                          "train": train})
    return ["--quantized", str(quantized), "--padded", str(data[False]),
            "--packed", str(data[True]), "--settings", str(path),
            "--warmup", str(plan["warmup"])]


def measure(args: list[str], plan: dict, threads: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for rep in range(plan["repeats"]):
        for group in support.worker_groups(MODES, rep, plan["one_process"]):
            result = support.run_worker("packing", [*group, *args], threads)
            for mode in group:
                runs[mode].append(result["runs"][mode])
                print(f"packing: {mode}, run {rep + 1}/{plan['repeats']}: "
                      f"{rate(runs[mode]):.1f} effective tokens/s", flush=True)
    return runs


def rate(runs: list[dict]) -> float:
    """Effective tokens per second over every measured step of these runs."""
    return (sum(sum(r["tokens"]) for r in runs) / sum(sum(r["seconds"]) for r in runs))


def summary(runs: dict[str, list[dict]], plan: dict, threads: int) -> dict:
    rates = {mode: rate(runs[mode]) for mode in MODES}
    ratio = rates["packed"] / rates["padded"]
    modes = {mode: {"effective_tokens_per_second": rates[mode],
                    "padding_share": padding_share(runs[mode]), "runs": runs[mode]}
             for mode in MODES}
    return {"name": "packing", "figure": round(ratio, 3),
            "figure_text": f"packed/padded {ratio:.2f}×, packed/grouped "
                           f"{rates['packed'] / rates['grouped']:.2f}×",
            "goal": f"packed ≥ {GOAL} × padded effective tokens/s",
            "met": ratio >= GOAL,
            "details": {"threads": threads, "batch_rows": BATCH, "max_length": MAX_LENGTH,
                        "dataset": DATASET, "settings_task": SETTINGS_TASK, **plan,
                        "ratio_packed_to_grouped": rates["packed"] / rates["grouped"],
                        "modes": modes}}


def padding_share(runs: list[dict]) -> float:
    """The share of the batches' cells that held padding, over the measured steps."""
    real = sum(sum(r["tokens"]) for r in runs)
    return 1 - real / sum(sum(r["cells"]) for r in runs)


def markdown(result: dict) -> str:
    d = result["details"]
    lines = [(f"# packing: effective tokens/s ({d['dataset']['name']}, {d['batch_rows']} rows "
              f"of ≤ {d['max_length']} tokens per step, {d['threads']} threads)"), "",
             (f"Goal: {result['goal']}. {d['repeats']} repeats × "
              f"{d['steps'] - d['warmup'] - 1} measured steps of {d['steps']}. "
              f"{result['figure_text']}."), "",
             "| mode | effective tokens/s | padding share | vs padded |", "|---|---|---|---|"]
    padded = d["modes"]["padded"]["effective_tokens_per_second"]
    for mode, m in d["modes"].items():
        rate_ = m["effective_tokens_per_second"]
        lines.append(f"| {mode} | {rate_:.1f} | {m['padding_share']:.1%} | "
                     f"{rate_ / padded:.2f}× |")
    return "\n".join(lines) + "\n"


# ---- worker ----------------------------------------------------------------------------------

def train_one(mode: str, args, settings: dict, timer, batches: list) -> None:
    """The pipeline's training on one mode's data; `batches` receives (tokens, cells) of every
    batch the pipeline's collator builds from the start of training on."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainerCallback

    from qlora_pipeline.core.policy import Policy
    from qlora_pipeline.training import loop
    from qlora_pipeline.training import packing as packing_lib
    from qlora_pipeline.training.lora import prepare_qlora

    class CountingCollator(packing_lib.Collator):
        def __call__(self, features):
            tokens = sum(len(f["input_ids"]) for f in features)
            batch = super().__call__(features)
            batches.append((tokens, batch["input_ids"].numel()))
            return batch

    class FromTrainingOn(TrainerCallback):  # the packing check and first evaluation collate too
        def on_train_begin(self, *a, **k):
            batches.clear()

    policy = Policy.detect()
    checkpointing = policy.gradient_checkpointing(settings["train"]["gradient_checkpointing"])
    data = load_from_disk(args.packed if mode == "packed" else args.padded)
    train = {**settings["train"], "group_by_length": mode == "grouped"}
    model, _ = prepare_qlora(args.quantized, settings["lora"], policy, checkpointing,
                             loop.total_steps(train, len(data["train"])))
    # The collator counts the real tokens of each batch where the pipeline builds it.
    with mock.patch.object(packing_lib, "Collator", CountingCollator), \
            tempfile.TemporaryDirectory() as work:
        loop.train(model, AutoTokenizer.from_pretrained(args.quantized), data, train,
                   Path(work) / "checkpoints", Path(work) / "metrics.jsonl", 0, policy,
                   observers=(FromTrainingOn(), timer))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Effective tokens/s of one batching mode "
                                                 "of the pipeline's training, in this process.")
    parser.add_argument("modes", nargs="+", choices=MODES)
    for name in ("--quantized", "--padded", "--packed", "--settings", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.timing import StepTimer

    torch.set_num_threads(args.threads)
    settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    runs = {}
    for mode in args.modes:
        timer, batches = StepTimer(args.warmup), []
        train_one(mode, args, settings, timer, batches)
        steps = timer.measured_steps()  # gradient_accumulation 1: step i used batch i
        runs[mode] = {"seconds": timer.seconds_per_step(),
                      "tokens": [batches[i][0] for i in steps],
                      "cells": [batches[i][1] for i in steps]}
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "runs": runs},
                                         indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
