"""Peak memory of merging a LoRA adapter: the pipeline's streamed merge against PEFT's
in-memory `merge_and_unload` (load, merge, save_pretrained), at two model sizes.

    python -m benchmarks.merge_memory [--smoke]                     # both sizes, both merges
    python -m benchmarks.merge_memory measure IMPL BASE ADAPTER OUT  # one merge, prints JSON

The models are synthetic (Llama-shaped, random bf16 weights, saved in shards like a hub
checkpoint) and written tensor by tensor, so making a 1B model does not itself need 1B of RAM.
Each merge runs in its own process; its peak RSS (VmHWM, reset after the imports) is
reported next to the RSS after imports, so the figure is what the merge itself added. Goal:
the streamed merge's peak is about one shard plus the adapter, not the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab}


# Llama shapes: ~1.1B (TinyLlama's) and ~0.27B; tiny ones for the smoke run in CI.
SIZES = {"1.1B": llama(2048, 5632, 22, 32, 4, 32000), "0.27B": llama(1024, 2816, 16, 16, 4, 32000)}
SMOKE_SIZES = {"tiny-a": llama(64, 128, 2, 4, 2, 256), "tiny-b": llama(128, 256, 4, 4, 2, 256)}
SHARD = "200MB"
SHARD_BYTES = 200 * 10 ** 6
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP = ("gate_proj", "up_proj", "down_proj")


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start the peak RSS afresh (Linux ≥ 4.0), so the imports' own transient peak (bitsandbytes
    compiles at import) does not hide the merge's."""
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_model(shape: dict, out: Path, shard: str) -> int:
    """A Llama-shaped checkpoint with random bf16 weights, written one shard at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):  # shapes only; the values are drawn shard by shard below
        meta = AutoModelForCausalLM.from_config(config).state_dict()
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard)
    generator = torch.Generator().manual_seed(0)
    out.mkdir(parents=True)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: (torch.randn(meta[k].shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for k in keys}, out / name, metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    config.save_pretrained(out)
    return sum(t.numel() for t in meta.values())


def synthetic_adapter(shape: dict, out: Path, rank: int = RANK) -> None:
    """A LoRA adapter (r 16 unless told, all linear layers, B ≠ 0) in PEFT's format: PEFT
    writes the config; the tensors are drawn directly (a model to inject into would cost the
    RAM this benchmark measures)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator, tensors = torch.Generator().manual_seed(1), {}
    for module, (fan_in, fan_out) in linear_layers(shape).items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
               target_modules=TARGETS).save_pretrained(out)


def linear_layers(shape: dict) -> dict[str, tuple[int, int]]:
    """{module path: (fan_in, fan_out)} of every linear layer of a Llama of this shape."""
    hidden, inter, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hidden // heads
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    return {f"model.layers.{layer}.{'mlp' if name in MLP else 'self_attn'}.{name}": size
            for layer in range(shape["num_hidden_layers"]) for name, size in dims.items()}


def measure(impl: str, base: Path, adapter: Path, out: Path) -> dict:
    """One merge in this process: seconds and peak RSS, after the imports both need."""
    import peft  # noqa: F401  (imported by both, so the baseline counts it alike)
    import transformers  # noqa: F401

    from qlora_pipeline.training import streamed_merge

    gc.collect()
    reset_peak()
    baseline, start = status_mb("VmRSS"), time.perf_counter()
    if impl == "streamed":
        streamed_merge.merge(base, adapter, out, torch.bfloat16, max_shard_bytes=SHARD_BYTES)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size=SHARD)
    return {"impl": impl, "seconds": time.perf_counter() - start,
            "baseline_rss_mb": baseline, "peak_rss_mb": status_mb("VmHWM")}


def measured(impl: str, base: Path, adapter: Path, work: Path) -> dict:
    out = work / f"merged-{impl}"
    result = subprocess.run([sys.executable, "-m", "benchmarks.merge_memory", "measure", impl,
                             str(base), str(adapter), str(out)], cwd=REPO, check=True,
                            capture_output=True, text=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["added_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
    return row


def run(smoke: bool = False) -> dict:
    sizes = SMOKE_SIZES if smoke else SIZES
    shard, shard_mb = ("64KB", 0.064) if smoke else (SHARD, SHARD_BYTES / 1e6)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in sizes.items():
            work = Path(tmp) / label
            params = synthetic_model(shape, work / "base", shard)
            synthetic_adapter(shape, work / "adapter")
            model_mb = params * 2 / 1e6
            for impl in ("streamed", "peft"):
                row = measured(impl, work / "base", work / "adapter", work)
                rows.append({"model": label, "parameters": params, "model_mb": model_mb,
                             "shard_mb": shard_mb, **row})
                print(f"merge_memory: {label} {impl}: +{row['added_mb']:.0f} MB over "
                      f"{row['baseline_rss_mb']:.0f} MB, {row['seconds']:.1f} s", flush=True)
    largest = max(sizes, key=lambda label: next(r["parameters"] for r in rows
                                                if r["model"] == label))
    by_impl = {r["impl"]: r for r in rows if r["model"] == largest}
    ratio = by_impl["streamed"]["added_mb"] / by_impl["peft"]["added_mb"]
    return {"name": "merge_memory",
            "figure": round(ratio, 3),
            "figure_label": f"streamed / PEFT merge, added peak RSS ({largest})",
            "goal": "streamed merge adds < half the model (~ one shard + the adapter)",
            "met": by_impl["streamed"]["added_mb"] < 0.5 * by_impl["streamed"]["model_mb"]
            if not smoke else None,
            "details": {"rows": rows, "shard": shard}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("measure")
    one.add_argument("impl", choices=["streamed", "peft"])
    for name in ("base", "adapter", "out"):
        one.add_argument(name, type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "measure":
        print(json.dumps(measure(args.impl, args.base, args.adapter, args.out)))
    else:
        print(json.dumps(run(args.smoke), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
