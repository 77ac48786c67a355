"""train_step: the pipeline's training step against a bare Trainer + PEFT script.

Same saved 4-bit model, tokenized task, batch, LoRA, optimizer, seed and thread count; goal:
pipeline ≤ 1.03 × bare seconds per step. `run` (in the driver) starts one worker process per
measurement, the two implementations alternating; the worker (`python -m
benchmarks.train_step pipeline|bare ...`) times one implementation:

`pipeline`: what the train_qlora job runs (the saved 4-bit base from the loader, LoRA injected
by lora.inject, loop.train with its callbacks and guards). `bare`: a plain Trainer + PEFT
script on the same checkpoint and data. Both are timed by timing.StepTimer; evaluation and
saving come after the last step, outside the measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import support
from qlora_pipeline.core import layout

GOAL = 1.03
IMPLS = ("pipeline", "bare")
TASK = "arithmetic"
INPUTS = [layout.quantized(), layout.tokenized(TASK)]  # made by the pipeline before a full run
FULL = {"repeats": 3, "steps": 16, "warmup": 2, "one_process": False}
SMOKE = {"repeats": 1, "steps": 4, "warmup": 1, "one_process": True}


def run(smoke: bool, threads: list[int] | None = None) -> dict:
    plan = SMOKE if smoke else FULL
    if smoke:
        quantized, data, threads = support.tiny_quantized(), support.tiny_arithmetic(), [1]
    else:
        quantized, data = support.REPO / layout.quantized(), support.REPO / layout.tokenized(TASK)
        threads = threads or sorted({1, support.default_threads()})
    rows = [measure_threads(n, plan, quantized, data) for n in threads]
    worst = max(rows, key=lambda r: r["ratio_pipeline_to_bare"])
    return {"name": "train_step", "figure": round(worst["ratio_pipeline_to_bare"], 4),
            "figure_text": ", ".join(f"{r['ratio_pipeline_to_bare']:.3f} ({r['threads']} thr)"
                                     for r in rows),
            "goal": f"pipeline ≤ {GOAL} × bare s/step at every thread count",
            "met": worst["ratio_pipeline_to_bare"] <= GOAL,
            "details": {"task": TASK, **plan, "rows": rows}}


def measure_threads(threads: int, plan: dict, quantized: Path, data: Path) -> dict:
    samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for rep in range(plan["repeats"]):
        for group in support.worker_groups(IMPLS, rep, plan["one_process"]):
            result = support.run_worker("train_step", [
                *group, "--quantized", str(quantized), "--tokenized", str(data), "--task", TASK,
                "--steps", str(plan["steps"]), "--warmup", str(plan["warmup"])], threads)
            for impl in group:
                samples[impl] += result["seconds_per_step"][impl]
                print(f"train_step: {impl}, {threads} thread(s), run {rep + 1}/"
                      f"{plan['repeats']}: median {support.median(samples[impl]):.3f} s/step",
                      flush=True)
    median = {impl: support.median(samples[impl]) for impl in IMPLS}
    return {"threads": threads, "steps_measured": {i: len(samples[i]) for i in IMPLS},
            "median_seconds_per_step": median,
            "ratio_pipeline_to_bare": median["pipeline"] / median["bare"], "samples": samples}


def markdown(result: dict) -> str:
    d = result["details"]
    lines = [f"# train_step: pipeline vs bare Trainer + PEFT ({d['task']})", "",
             (f"Goal: {result['goal']}. {d['repeats']} repeats × "
              f"{d['steps'] - d['warmup'] - 1} measured steps of {d['steps']}."), "",
             "| threads | pipeline s/step | bare s/step | ratio | goal |", "|---|---|---|---|---|"]
    for row in d["rows"]:
        med, ratio = row["median_seconds_per_step"], row["ratio_pipeline_to_bare"]
        lines.append(f"| {row['threads']} | {med['pipeline']:.3f} | {med['bare']:.3f} | "
                     f"{ratio:.3f} | {'met' if ratio <= GOAL else 'MISSED'} |")
    return "\n".join(lines) + "\n"


# ---- worker ----------------------------------------------------------------------------------

def pipeline(quantized, data, tokenizer, settings: dict, steps: int, seed: int, work: Path,
             timer) -> None:
    from qlora_pipeline.core.policy import Policy
    from qlora_pipeline.training import loop
    from qlora_pipeline.training.lora import prepare_qlora

    cfg = support.bench_train_cfg(settings["train"], steps)
    policy = Policy.detect()
    model, _ = prepare_qlora(quantized, settings["lora"], policy,
                             policy.gradient_checkpointing(cfg["gradient_checkpointing"]), steps)
    loop.train(model, tokenizer, data, cfg, work / "checkpoints", work / "metrics.jsonl", seed,
               policy, observers=(timer,))


def bare(quantized, data, tokenizer, settings: dict, steps: int, seed: int, work: Path,
         timer) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    lora, train = settings["lora"], support.bench_train_cfg(settings["train"], steps)
    model = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
    args = TrainingArguments(
        output_dir=str(work / "bare"), max_steps=steps,
        per_device_train_batch_size=train["batch_size"], learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler"], warmup_steps=round(train["warmup_ratio"] * steps),
        weight_decay=train["weight_decay"], max_grad_norm=train["max_grad_norm"],
        optim="adamw_torch", use_cpu=True, seed=seed, data_seed=seed, save_strategy="no",
        logging_steps=train["logging_steps"], report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data["train"], callbacks=[timer],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                 label_pad_token_id=-100)).train()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Seconds per optimizer step of one "
                                                 "training implementation, in this process.")
    parser.add_argument("impls", nargs="+", choices=IMPLS)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--task", required=True, help="whose settings (config/config.yaml)")
    parser.add_argument("--quantized", required=True)
    parser.add_argument("--tokenized", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from benchmarks.timing import StepTimer

    torch.set_num_threads(args.threads)
    data = load_from_disk(args.tokenized)
    tokenizer = AutoTokenizer.from_pretrained(args.quantized)
    seconds = {}
    for name in args.impls:
        timer = StepTimer(args.warmup)
        with tempfile.TemporaryDirectory() as work:
            impl = pipeline if name == "pipeline" else bare
            impl(args.quantized, data, tokenizer, support.task_settings(args.task), args.steps,
                 0, Path(work), timer)
        seconds[name] = timer.seconds_per_step()
    Path(args.out).write_text(json.dumps({
        "threads": torch.get_num_threads(), "task": args.task, "steps": args.steps,
        "warmup": args.warmup, "seconds_per_step": seconds}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
