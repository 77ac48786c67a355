"""Seconds per optimizer step of one training implementation, measured in this process.

    python benchmarks/train_step.py pipeline|bare --threads N --steps S --out FILE.json

`pipeline`: what the train_qlora job runs (the saved 4-bit base from the loader, LoRA injected
by lora.inject, loop.train with its callbacks and guards). `bare`: a plain Trainer + PEFT
script on the same checkpoint, data, batch, sequence lengths, LoRA, optimizer and seed. Both
are timed the same way: the wall time between the ends of consecutive optimizer steps, so
everything a step costs (data, logging, callbacks) is counted. The first WARMUP steps are
left out. The task's settings come from the pipeline's own config (config/config.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent.parent
WARMUP = 2


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[WARMUP:], self.ends[WARMUP + 1:])]


def task_settings(task: str) -> dict:
    import yaml

    from qlora_pipeline.config import load_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    _, tasks = load_config(config, root=REPO)
    return tasks[task]


def bench_cfg(train: dict, steps: int) -> dict:
    """The task's training block, run for `steps` with evaluation and saving only at the end."""
    return {**train, "max_steps": steps, "epochs": None, "eval_steps": steps,
            "checkpoint_steps": None, "early_stopping_patience": None}


def pipeline(quant_dir, data, tokenizer, settings: dict, steps: int, seed: int, work: Path,
             timer: StepTimer) -> None:
    from qlora_pipeline.policy import Policy
    from qlora_pipeline.training import loop
    from qlora_pipeline.training.lora import prepare_qlora

    cfg = bench_cfg(settings["train"], steps)
    policy = Policy.detect()
    model, _ = prepare_qlora(quant_dir, settings["lora"], policy,
                             policy.gradient_checkpointing(cfg["gradient_checkpointing"]))
    loop.train(model, tokenizer, data, cfg, work / "checkpoints", work / "metrics.jsonl", seed,
               policy, observers=(timer,))


def bare(quant_dir, data, tokenizer, settings: dict, steps: int, seed: int, work: Path,
         timer: StepTimer) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    lora, train = settings["lora"], bench_cfg(settings["train"], steps)
    model = AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", choices=["pipeline", "bare"])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--results", default=str(REPO / "results"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    results = Path(args.results)
    quant_dir = results / "models" / "quantized"
    data = load_from_disk(str(results / "data" / args.task / "tokenized"))
    tokenizer = AutoTokenizer.from_pretrained(quant_dir)
    settings = task_settings(args.task)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as work:
        run = pipeline if args.impl == "pipeline" else bare
        run(quant_dir, data, tokenizer, settings, args.steps, 0, Path(work), timer)
    Path(args.out).write_text(json.dumps({
        "impl": args.impl, "threads": torch.get_num_threads(), "task": args.task,
        "steps": args.steps, "warmup": WARMUP, "seconds_per_step": timer.seconds_per_step(),
    }, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
