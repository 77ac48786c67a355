"""serving: several tasks served from one 4-bit base without merging (issue 15 item 5):
greedy generation latency (ms per generated token) and memory of four set-ups.

- quantized: the 4-bit base alone, the floor;
- switching: the 4-bit base with every task's QLoRA adapter loaded at once (PEFT adapters by
  name), each request served by the next adapter in turn (round robin, `set_adapter` just
  before it; those calls are timed too);
- combined: the 4-bit base with the tasks' combined adapter (one PEFT LoRA adapter, unmerged);
- merged: that combined adapter merged into the full-precision base (PEFT merge_and_unload).

The figure is switching/combined latency: a request served by its own task's adapter against
all tasks at once through the combination (whose rank and layers are those of every task
together). No goal: it is what serving without merging costs, to be read beside the scores of
the combination. The models are the pipeline's own: the base, the quantized base, each task's
QLoRA adapter and their combination (layout.combination), each loaded as the evaluation stage
loads it (evaluation.harness.load_model). Each set-up is measured in its own process at the
same thread count, the set-ups alternating across repeats; a process generates a fixed number
of new tokens (no stop at end-of-sequence) for each prompt of inference.PROMPTS, one request
at a time, after one untimed warm-up generation (switching: one per adapter). Memory, per
process: RSS after the imports (peft and bitsandbytes for every set-up alike), RSS once the
model is loaded, peak RSS (getrusage ru_maxrss, after generating), and the bytes of the
model's parameters and buffers (a 4-bit weight counted with its quantization constants; the
LoRA weights also apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import support
from benchmarks.inference import PROMPTS, generation_inputs
from qlora_pipeline.core import layout

SETUPS = ("quantized", "switching", "combined", "merged")
TASKS = ("arithmetic", "topic")
COMBINATION = "-".join(TASKS)
INPUTS = [layout.base(), layout.quantized(), *(layout.adapter(task, "qlora") for task in TASKS),
          layout.combination(COMBINATION)]
# --smoke: the tiny adapters' layers, different as the tasks' are (arithmetic: all linear
# layers; topic: attention's q and v), so the combination spans both.
TINY_TARGETS = {"arithmetic": "all-linear", "topic": ["q_proj", "v_proj"]}
MEMORY = ("rss_imports_mb", "rss_loaded_mb", "peak_rss_mb", "model_bytes", "adapter_bytes")


def run(smoke: bool, threads: list[int] | None = None) -> dict:
    plan, paths, threads = support.generation_setup(smoke, threads, tiny_models,
                                                    pipeline_models)
    args = [*(f"--{name}={paths[name]}" for name in ("base", "quantized", "combined")),
            "--adapters", *(f"{task}={path}" for task, path in paths["adapters"].items())]
    seconds: dict[str, list[float]] = {s: [] for s in SETUPS}
    memory: dict[str, list[dict]] = {s: [] for s in SETUPS}
    switches: list[float] = []
    for rep, group, result in support.generation_runs("serving", SETUPS, plan, args, threads):
        for setup in group:
            measured = result["setups"][setup]
            seconds[setup] += measured["seconds_per_token"]
            memory[setup].append({key: measured[key] for key in MEMORY})
            switches += measured.get("switch_seconds", [])
            print(f"serving: {setup}, run {rep + 1}/{plan['repeats']}: median "
                  f"{support.median(seconds[setup]) * 1e3:.1f} ms/token, peak RSS "
                  f"{measured['peak_rss_mb']:.0f} MB", flush=True)
    return summary(seconds, memory, switches, plan, threads, paths)


def pipeline_models() -> dict:
    """The base, the quantized base, each task's QLoRA adapter and their combination."""
    return {"base": support.REPO / layout.base(), "quantized": support.REPO / layout.quantized(),
            "combined": support.REPO / layout.combination(COMBINATION),
            "adapters": {task: support.REPO / layout.adapter(task, "qlora") for task in TASKS}}


def tiny_models() -> dict:
    """The tiny base and its quantized version, a LoRA adapter per task on the quantized base
    with random (nonzero) weights on different layers (TINY_TARGETS), and their combination by
    concatenation (analysis.combine, method cat)."""
    from peft import LoraConfig, get_peft_model

    from qlora_pipeline.analysis.combine import combine
    from qlora_pipeline.evaluation.harness import load_model
    from qlora_pipeline.core.policy import Policy

    root, base = support.scratch() / "serving", support.tiny_base()
    quantized = support.tiny_quantized()
    adapters = {}
    for task, targets in TINY_TARGETS.items():
        model, _ = load_model(Policy.detect(), base, quantized=quantized)
        adapters[task] = root / "adapters" / task
        get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets,
            init_lora_weights=False)).save_pretrained(adapters[task])
    combined = root / "combined"
    combined.mkdir(parents=True)
    combine(adapters, combined, {"method": "cat", "weights": [1.0] * len(adapters),
                                 "density": None, "svd_rank": None})
    return {"base": base, "quantized": quantized, "combined": combined, "adapters": adapters}


def summary(seconds: dict[str, list[float]], memory: dict[str, list[dict]],
            switches: list[float], plan: dict, threads: int, paths: dict) -> dict:
    latency = {s: support.median(seconds[s]) for s in SETUPS}
    vs_quantized = {s: latency[s] / latency["quantized"] for s in SETUPS}
    ratio = latency["switching"] / latency["combined"]
    switch_us = support.median(switches) * 1e6
    return {"name": "serving", "figure": round(ratio, 3),
            "figure_label": "switching / combined adapter, ms per token",
            "figure_text": (f"switching/combined {ratio:.2f}×; vs quantized: switching "
                            f"{vs_quantized['switching']:.2f}×, combined "
                            f"{vs_quantized['combined']:.2f}×, merged "
                            f"{vs_quantized['merged']:.2f}×; a switch {switch_us / 1e3:.1f} ms"),
            "goal": "none (reported: what serving several tasks without merging costs)",
            "met": None,
            "details": {"tasks": list(TASKS), "combination": COMBINATION, "threads": threads,
                        "prompts": len(PROMPTS), **plan,
                        "models": {**{k: str(v) for k, v in paths.items() if k != "adapters"},
                                   "adapters": {k: str(v) for k, v in paths["adapters"].items()}},
                        "seconds_per_token": latency,
                        "tokens_per_second": {s: 1 / latency[s] for s in SETUPS},
                        "ratio_to_quantized": vs_quantized,
                        "switch_microseconds": switch_us,
                        "memory": {s: {key: support.median([m[key] for m in memory[s]])
                                       for key in MEMORY} for s in SETUPS},
                        "samples": {"seconds_per_token": seconds, "memory": memory,
                                    "switch_seconds": switches}}}


def markdown(result: dict) -> str:
    d = result["details"]
    lines = [(f"# serving: {len(d['tasks'])} tasks ({', '.join(d['tasks'])}) on one base, "
              f"greedy generation, {d['prompts']} prompts × {d['new_tokens']} new tokens, "
              f"batch 1, {d['threads']} threads"), "",
             f"Goal: {result['goal']}. {result['figure_text']} (median `set_adapter`).", "",
             "| set-up | ms/token | tokens/s | vs quantized | model MB | of it LoRA MB | "
             "RSS loaded MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for setup in SETUPS:
        latency, m = d["seconds_per_token"][setup], d["memory"][setup]
        lines.append(f"| {setup} | {latency * 1e3:.1f} | {1 / latency:.1f} | "
                     f"{d['ratio_to_quantized'][setup]:.3f}× | {m['model_bytes'] / 1e6:.4g} | "
                     f"{m['adapter_bytes'] / 1e6:.3g} | {m['rss_loaded_mb']:.0f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


# ---- worker ----------------------------------------------------------------------------------

def load(setup: str, policy, paths: argparse.Namespace, adapters: dict[str, str]):
    """(model, tokenizer) of one set-up, loaded as the evaluation stage loads a model."""
    from peft import PeftModel

    from qlora_pipeline.evaluation.harness import load_model

    if setup == "merged":
        model, tokenizer = load_model(policy, paths.base, adapter=paths.combined)
        return model.merge_and_unload(), tokenizer
    model, tokenizer = load_model(policy, paths.base, quantized=paths.quantized,
                                  adapter=paths.combined if setup == "combined" else None)
    if setup == "switching":
        (first, path), *others = adapters.items()
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, path in others:
            model.load_adapter(path, adapter_name=name)
        model.eval()
    return model, tokenizer


def latencies(model, tokenizer, new_tokens: int, passes: int,
              adapters: tuple[str, ...] = ()) -> tuple[list[float], list[float]]:
    """Seconds per generated token of each request (each prompt in each pass), after one
    warm-up generation per adapter (one without), and the seconds of each `set_adapter`: with
    adapters, request i is served by adapters[i % len(adapters)], set just before it."""
    import torch

    inputs, options = generation_inputs(tokenizer, new_tokens)
    out, switches = [], []
    with torch.inference_mode():
        for name in adapters or (None,):
            if name:
                model.set_adapter(name)
            model.generate(**inputs[0], **options)
        requests = [prompt for _ in range(passes) for prompt in inputs]
        for i, prompt in enumerate(requests):
            if adapters:
                start = time.perf_counter()
                model.set_adapter(adapters[i % len(adapters)])
                switches.append(time.perf_counter() - start)
            start = time.perf_counter()
            ids = model.generate(**prompt, **options)
            out.append((time.perf_counter() - start) / new_tokens)
            assert ids.shape[1] - prompt["input_ids"].shape[1] == new_tokens
    return out, switches


def model_bytes(model) -> tuple[int, int]:
    """Bytes of the model's parameters and buffers (a 4-bit weight with its quantization
    constants: models/methods/bnb4.stored_bytes), and of its LoRA weights among them."""
    from qlora_pipeline.models.methods import bnb4

    quantized = {id(m.weight): bnb4.stored_bytes(m) for m in model.modules()
                 if isinstance(m, bnb4.layer_class())}
    total = adapter = 0.0
    for name, tensor in model.named_parameters():
        size = quantized.get(id(tensor), tensor.numel() * tensor.element_size())
        total += size
        adapter += size if ".lora_" in name else 0
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return round(total), round(adapter)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generation latency and memory of serving "
                                                 "set-ups, in this process.")
    parser.add_argument("setups", nargs="+", choices=SETUPS)
    for name in ("--base", "--quantized", "--combined", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--adapters", nargs="+", required=True, metavar="TASK=PATH")
    for name in ("--threads", "--new-tokens", "--passes"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    adapters = dict(item.split("=", 1) for item in args.adapters)

    import gc
    import resource

    import peft  # noqa: F401  (and bitsandbytes: imported before the baseline by every set-up)
    import torch

    from benchmarks.merge_memory import status_mb
    from qlora_pipeline.core.policy import Policy

    torch.set_num_threads(args.threads)
    policy, results = Policy.detect(), {}
    for setup in args.setups:
        gc.collect()
        imports = status_mb("VmRSS")
        model, tokenizer = load(setup, policy, args, adapters)
        loaded = status_mb("VmRSS")
        total, adapter = model_bytes(model)
        seconds, switches = latencies(model, tokenizer, args.new_tokens, args.passes,
                                      tuple(adapters) if setup == "switching" else ())
        results[setup] = {
            "seconds_per_token": seconds, "rss_imports_mb": imports, "rss_loaded_mb": loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            "model_bytes": total, "adapter_bytes": adapter,
            **({"switch_seconds": switches} if setup == "switching" else {})}
        del model
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "setups": results},
                                         indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
