"""inference: greedy generation latency (seconds per generated token) and tokens/s of the
base, the merged model, and the base with the adapter unmerged (PEFT).

The figure is unmerged/base latency (unmerged LoRA is said to cost 10-20 %); the merged model
has the base's shapes, so merged/base must be 1 within noise (the goal). The models are the
pipeline's own outputs for one task: the full-precision base, the task's final adapter (the
one the merge used) and its merged model, each loaded as the evaluation stage loads it
(evaluation.harness.load_model). Each variant is measured in its own process at the same
thread count, the variants alternating across repeats; a process generates a fixed number of
new tokens (no stop at end-of-sequence) for each prompt of a fixed set, one prompt at a time,
after one untimed warm-up generation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import support
from qlora_pipeline.core import layout

NOISE = 0.05  # merged/base within 1 ± NOISE counts as equal
VARIANTS = ("base", "merged", "unmerged")
TASK = "arithmetic"  # its LoRA spans all linear layers: the costliest unmerged adapter here
INPUTS = [layout.base(), layout.merged(TASK)]  # the merge's inputs include the adapter
PROMPTS = ("What is 17 + 5? Answer with the number only.",
           ("Classify the topic of the sentence as one of: sports, food, weather, technology.\n"
            "Sentence: The chef served a spicy curry.\nAnswer with the topic only."),
           "Write one sentence about the sea.",
           "List three colours.")


def run(smoke: bool, threads: list[int] | None = None) -> dict:
    plan, paths, threads = support.generation_setup(smoke, threads, tiny_models,
                                                    pipeline_models)
    args = [f"--{name}={path}" for name, path in paths.items()]
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep, group, result in support.generation_runs("inference", VARIANTS, plan, args,
                                                      threads):
        for variant in group:
            seconds[variant] += result["seconds_per_token"][variant]
            print(f"inference: {variant}, run {rep + 1}/{plan['repeats']}: median "
                  f"{support.median(seconds[variant]) * 1e3:.1f} ms/token", flush=True)
    return summary(seconds, plan, threads, {k: str(v) for k, v in paths.items()})


def pipeline_models() -> dict[str, Path]:
    """The task's base, final adapter (recovered when recovery is on) and merged model."""
    kind = "recovered" if support.task_settings(TASK)["recovery"]["enabled"] else "qlora"
    return {"base": support.REPO / layout.base(),
            "adapter": support.REPO / layout.adapter(TASK, kind),
            "merged": support.REPO / layout.merged(TASK)}


def tiny_models() -> dict[str, Path]:
    """The tiny base, a LoRA adapter on all its linear layers with random (nonzero) weights,
    and the base with that adapter merged (PEFT's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, base = support.scratch() / "inference", support.tiny_base()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear",
        init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged", safe_serialization=True)
    return {"base": base, "adapter": root / "adapter", "merged": root / "merged"}


def summary(seconds: dict[str, list[float]], plan: dict, threads: int, paths: dict) -> dict:
    latency = {v: support.median(seconds[v]) for v in VARIANTS}
    unmerged, merged = (latency[v] / latency["base"] for v in ("unmerged", "merged"))
    return {"name": "inference", "figure": round(unmerged, 3),
            "figure_text": f"unmerged/base {unmerged:.2f}×, merged/base {merged:.2f}×",
            "goal": f"merged/base latency within 1 ± {NOISE} (unmerged/base: reported)",
            "met": abs(merged - 1) <= NOISE,
            "details": {"task": TASK, "threads": threads, "prompts": len(PROMPTS), **plan,
                        "models": paths, "ratio_merged_to_base": merged,
                        "seconds_per_token": latency,
                        "tokens_per_second": {v: 1 / latency[v] for v in VARIANTS},
                        "samples": seconds}}


def markdown(result: dict) -> str:
    d = result["details"]
    lines = [(f"# inference: greedy generation, {d['prompts']} prompts × {d['new_tokens']} new "
              f"tokens, batch 1, {d['threads']} threads ({d['task']})"), "",
             f"Goal: {result['goal']}. {result['figure_text']}.", "",
             "| variant | ms/token | tokens/s | vs base |", "|---|---|---|---|"]
    base = d["seconds_per_token"]["base"]
    for variant, latency in d["seconds_per_token"].items():
        lines.append(f"| {variant} | {latency * 1e3:.1f} | {1 / latency:.1f} | "
                     f"{latency / base:.3f}× |")
    return "\n".join(lines) + "\n"


# ---- worker ----------------------------------------------------------------------------------

def generation_inputs(tokenizer, new_tokens: int) -> tuple[list, dict]:
    """PROMPTS as chat-templated model inputs, and greedy options generating exactly
    `new_tokens` (no stop at end-of-sequence)."""
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    inputs = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True) for c in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return inputs, {"do_sample": False, "max_new_tokens": new_tokens,
                    "min_new_tokens": new_tokens, "pad_token_id": pad}


def latencies(model, tokenizer, new_tokens: int, passes: int) -> list[float]:
    """Seconds per generated token of each prompt in each pass, after one warm-up."""
    import torch

    inputs, options = generation_inputs(tokenizer, new_tokens)
    out = []
    with torch.inference_mode():
        model.generate(**inputs[0], **options)
        for _ in range(passes):
            for prompt in inputs:
                start = time.perf_counter()
                ids = model.generate(**prompt, **options)
                out.append((time.perf_counter() - start) / new_tokens)
                assert ids.shape[1] - prompt["input_ids"].shape[1] == new_tokens
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generation latency of model variants, in "
                                                 "this process.")
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    for name in ("--base", "--adapter", "--merged", "--out"):
        parser.add_argument(name, required=True)
    for name in ("--threads", "--new-tokens", "--passes"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)

    import torch

    from qlora_pipeline.evaluation.harness import load_model
    from qlora_pipeline.core.policy import Policy

    torch.set_num_threads(args.threads)
    policy, seconds = Policy.detect(), {}
    for variant in args.variants:
        model, tokenizer = load_model(
            policy, args.base, adapter=args.adapter if variant == "unmerged" else None,
            merged=args.merged if variant == "merged" else None)
        seconds[variant] = latencies(model, tokenizer, args.new_tokens, args.passes)
        del model
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(),
                                          "seconds_per_token": seconds}, indent=2),
                              encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
