"""Each model stage's peak memory, estimated from the model's shapes before anything loads,
and the run-time refusal of a stage that would not fit (docs/cluster.md, "Memory model").

Shapes come from a checkpoint's config.json and its safetensors headers (names, shapes,
dtypes: no weight is read); for planning a model not downloaded, benchmarks/memory_model.py
builds them from a config alone.
Written by hand: accelerate's `estimate-memory` counts weights only, and the published
figures (QLoRA, PEFT's FSDP guide) are per model, not per stage.

The estimate is meant as an upper bound of what the stage holds at once: weights as loaded,
the adapter's trainable state (fp32 weight, gradient, the optimizer's moments), activations
(Korthikanti et al. 2022: 34·s·b·h bytes per layer at 16-bit, plus the attention scores
where attention is not memory-efficient, i.e. on the CPU; with gradient checkpointing only
each layer's input is kept, plus one layer recomputed), and the output head's float32 logits
and their gradient over the whole sequence (the pipeline computes the head only at labelled
positions, so training needs less). On the CPU the process's own resident memory (torch and
the libraries, measured when the stage checks) is part of the peak.

`QLORA_SKIP_MEMORY_CHECK=1` turns the refusal into a warning (the estimate can be pessimistic,
e.g. for long sequences with few labelled tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
SKIP_ENV = "QLORA_SKIP_MEMORY_CHECK"
HEADROOM = 0.95  # of the free memory a stage may plan to use
GIB = 2 ** 30
# By a safetensors header's dtype name (the only names looked up here).
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Per trainable (adapter) parameter: fp32 weight and gradient, and the optimizer's state
# (AdamW: two fp32 moments; 8-bit AdamW: two 1-byte moments; SGD without momentum: none).
TRAINABLE_BYTES = {"adamw_torch": 16, "paged_adamw_32bit": 16, "paged_adamw_8bit": 10,
                   "adamw_8bit": 10, "adafactor": 12, "sgd": 8}
# Layer-name fragments of the output head and embeddings: kept in full precision, no LoRA.
NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out", "norm", "ln_")
# What a training holds besides model, adapter, activations and logits: the Trainer's and
# the optimizer's own buffers, and what they import after the check. Measured on the CPU:
# SmolLM2's trainings peaked 0.01-0.06 GiB above the other parts (docs/cluster.md).
TRAINER_BYTES = 96 * 2 ** 20
# A CPU job's resident memory grows by what it imports and allocates besides the model after
# the check (library modules, tokenizer, dataset pages, the allocator's slack): measured on
# SmolLM2, 10-100 MiB above the other parts across runs; counted in the baseline.
CPU_SLACK_BYTES = 128 * 2 ** 20
# A job that checks before it has imported its model libraries (no warm start) grows by
# them afterwards: its baseline is at least what a job holds with them loaded (torch,
# transformers, bitsandbytes, peft, lm-eval: 0.40-0.41 GiB measured in warm-start copies).
CPU_LIBRARIES_BYTES = 400 * 2 ** 20
MLP_NAMES = ("up", "gate", "down", "fc", "mlp", "h_to_4h", "4h_to_h", "w1", "w2", "w3")


class MemoryRefused(RuntimeError):
    """A stage's estimated peak exceeds the memory free for it: it stops before loading."""


@dataclass(frozen=True)
class Shapes:
    """What memory depends on: dimensions, and parameters by kind with their stored bytes."""
    hidden: int
    layers: int
    vocab: int
    heads: int
    intermediate: int
    linear_params: int  # 2-D weights of the blocks: quantized, and where LoRA goes
    other_params: int  # embeddings, output head, norms, biases
    stored_bytes: int  # as the checkpoint stores them (a 4-bit checkpoint: packed)
    largest_tensor: int = 0  # parameters of the largest tensor (a load's transient copy)

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Shapes:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        linear = other = stored = largest = 0
        for shard in sorted(directory.glob("*.safetensors")):
            for name, info in safetensors_header(shard).items():
                count = math.prod(info["shape"])
                stored += count * DTYPE_BYTES.get(info["dtype"], 4)
                largest = max(largest, count)
                if name.endswith(".weight") and len(info["shape"]) == 2 \
                        and not any(part in name for part in NOT_LINEAR):
                    linear += count
                elif "quant" not in name and "absmax" not in name:
                    other += count
        # (a 4-bit checkpoint's packed weights count as bytes)
        return cls(**dimensions(config), linear_params=linear, other_params=other,
                   stored_bytes=stored, largest_tensor=largest)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def dimensions(config: dict) -> dict:
    """Hidden size, layers, vocabulary, heads and MLP width under their usual names (a
    multimodal config's language model: its text_config)."""
    config = {**config, **(config.get("text_config") or {})}

    def first(*names, default=None):
        return next((config[n] for n in names if config.get(n) is not None), default)

    hidden = first("hidden_size", "n_embd", "d_model")
    return {"hidden": hidden, "layers": first("num_hidden_layers", "n_layer", "num_layers"),
            "vocab": first("vocab_size"), "heads": first("num_attention_heads", "n_head"),
            "intermediate": first("intermediate_size", "n_inner", "ffn_dim",
                                  default=4 * hidden if hidden else None)}


def safetensors_header(path: Path) -> dict:
    """A safetensors file's tensor table (its first 8 bytes give the JSON header's length)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def lora_params(shapes: Shapes, lora: dict) -> int:
    """r·(in + out) for every targeted layer, per block: attention layers take hidden→hidden,
    MLP layers hidden→intermediate (an approximation for grouped-query k/v: smaller)."""
    targets = lora["target_modules"]
    if targets == "all-linear":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    per_block = sum(shapes.hidden + (shapes.intermediate if any(m in t for m in MLP_NAMES)
                                     else shapes.hidden) for t in targets)
    # AdaLoRA trains init_r triplets per layer until the end (pruned ones are masked)
    rank = lora["adalora"]["init_r"] if lora.get("type") == "adalora" else lora["r"]
    return rank * per_block * shapes.layers


@dataclass
class Estimate:
    stage: str
    parts: dict[str, int] = field(default_factory=dict)  # bytes by what holds them
    remedy: str = ""  # what to change where this peak is refused, when not the stage's own

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GIB:.2f} GiB ({parts})"

    def as_dict(self) -> dict:
        return {"stage": self.stage, "total_mb": round(self.total / 2 ** 20, 1),
                "parts_mb": {k: round(v / 2 ** 20, 1) for k, v in self.parts.items()}}


def quantized_bytes(shapes: Shapes, compute_bytes: int, bits: float) -> int:
    """The block weights at `bits` each (the method's formula: models/methods/), the rest in
    the compute dtype."""
    return int(shapes.linear_params * bits / 8) + shapes.other_params * compute_bytes


def activation_bytes(shapes: Shapes, batch: int, seq: int, act_bytes: int, *,
                     checkpointing: bool, efficient_attention: bool, training: bool) -> int:
    """Per layer 34·s·b·h at 16-bit (17 values per hidden unit), plus the attention scores
    (heads·s² per row, with softmax: 2.5 copies, Korthikanti's 5·a·s²·b bytes at 16-bit)."""
    tokens = batch * seq
    scores = 0 if efficient_attention else int(2.5 * batch * shapes.heads * seq * seq * act_bytes)
    layer = 17 * tokens * shapes.hidden * act_bytes + scores
    if not training:  # nothing is kept for a backward pass: one layer at a time
        return layer
    if checkpointing:
        return shapes.layers * tokens * shapes.hidden * act_bytes + layer
    return shapes.layers * layer


def estimate(stage: str, shapes: Shapes, *, weights: str, compute_bytes: int,
             fp_bytes: int, batch: int = 1, seq: int = 1, lora: dict | None = None,
             checkpointing: bool = False, efficient_attention: bool = False,
             training: bool = False, baseline: int = 0, shards: int = 1,
             optimizer: str = "adamw_torch", bits: float | None = None) -> Estimate:
    """The stage's peak. `weights`: "stored" (a checkpoint loaded as stored: a 4-bit one),
    "4bit" (quantized from a full-precision checkpoint: the 4-bit result plus the largest
    tensor in fp32), "full" (full precision in fp_bytes), "full+4bit" (both at once),
    "merge" (the merge on the CPU: two full-precision models and the 4-bit one, measured:
    they load one after the other and the allocator does not return each before the next),
    "export" (the GGUF export's round trips on the CPU: the merged model for the reference
    answers, the importer's dequantized tensors and the model built from them, and llama.cpp's
    mapping of the file, up to half a float32 copy at f16; measured 1.9 GB on SmolLM2).
    `shards`: FSDP over that many GPUs: weights and the adapter's state are split, and each GPU
    holds one block's weights gathered whole while it computes. `bits`: per quantized
    weight, the method's formula (docs/quantization.md)."""
    parts = {"baseline": baseline}
    if bits is None and weights in ("4bit", "full+4bit", "merge"):
        raise ValueError(f"memory estimate of {stage}: weights {weights!r} need the method's "
                         f"bits per weight")
    q, full = quantized_bytes(shapes, compute_bytes, bits or 0), shapes.params * fp_bytes
    parts["weights"] = {"stored": shapes.stored_bytes, "4bit": q + shapes.largest_tensor * 4,
                        "full": full, "full+4bit": q + full, "merge": q + 2 * full,
                        "export": 7 * full // 2}[weights]
    if training:
        parts["trainer"] = TRAINER_BYTES
    if shards > 1:
        parts["gathered block"] = parts["weights"] // shapes.layers
        parts["weights"] //= shards
    if lora:
        per_param = TRAINABLE_BYTES.get(optimizer, 16) if training else compute_bytes
        parts["adapter"] = lora_params(shapes, lora) * per_param // shards
    parts["activations"] = activation_bytes(shapes, batch, seq, compute_bytes,
                                            checkpointing=checkpointing,
                                            efficient_attention=efficient_attention,
                                            training=training)
    # float32 logits over the batch; training: also their log-softmax and its gradient.
    # (Scoring takes the log-softmax at continuation positions only: evaluation/shared_context.)
    parts["logits"] = batch * seq * shapes.vocab * 4 * (3 if training else 1)
    return Estimate(stage, parts)


def rank_peak(stage: str, shapes: Shapes, *, shards: int = 1, **settings) -> Estimate:
    """The peak on one GPU (estimate's settings). Under FSDP (`shards` > 1) the larger of two:
    training's, sharded; and the load's, before it: each rank loads the whole model on its GPU
    and injects the adapter (float32) before FSDP shards them (docs/cluster.md)."""
    training = estimate(stage, shapes, shards=shards, **settings)
    if shards == 1:
        return training
    whole, lora = estimate(stage, shapes, **settings), settings.get("lora")
    loading = Estimate(f"{stage} at load (every rank holds the whole model before FSDP shards "
                       f"it)", {"baseline": whole.parts["baseline"],
                                "weights": whole.parts["weights"],
                                "adapter": lora_params(shapes, lora) * 4 if lora else 0},
                       remedy="GPUs that each hold the whole model: more GPUs do not lower "
                              "this peak")
    return max(training, loading, key=lambda peak: peak.total)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: str) -> tuple[int, str]:
    """Memory free for the stage, and what it is: the GPU's free memory, or the machine's
    available memory plus what this process already holds (which the estimate counts)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"free on {device}"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(next(line.split()[1] for line in meminfo.splitlines()
                       if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        return 0, "unknown"
    return kib * 1024 + resident_bytes(), "available RAM"


def check(estimate: Estimate, device: str, remedy: str, offload: bool = False) -> dict:
    """Refuse a stage whose estimated peak exceeds HEADROOM of the memory free for it (before
    it loads anything), naming the parts and what to change; log it otherwise. `offload`: a
    full-precision model that does not fit a GPU may spill to RAM (full_precision_placement)."""
    free, what = available_bytes(device)
    record = {**estimate.as_dict(), "available_mb": round(free / 2 ** 20, 1), "device": device}
    log.info("memory estimate of %s: %s; %s %.2f GiB", estimate.stage, estimate.describe(),
             what, free / GIB)
    if offload and device.startswith("cuda"):
        cpu = available_bytes("cpu")[0] - resident_bytes()
        record["offload"] = offload_plan(estimate.parts["weights"], free, cpu) is not None
        if record["offload"]:
            return record  # the loader places what does not fit in RAM
    if free and estimate.total > HEADROOM * free:
        message = (f"{estimate.stage}: estimated peak memory {estimate.describe()} exceeds "
                   f"{HEADROOM:.0%} of the {free / GIB:.2f} GiB {what}; expected it to fit: "
                   f"{estimate.remedy or remedy} (docs/cluster.md, memory model; {SKIP_ENV}=1 "
                   f"runs it anyway)")
        if os.environ.get(SKIP_ENV) == "1":
            log.warning("%s", message)
        else:
            raise MemoryRefused(message)
    return record


def cpu_baseline() -> int:
    """A CPU job's memory besides the model's parts: its resident memory now, at least the
    libraries' (CPU_LIBRARIES_BYTES), and the slack it adds after the check."""
    return max(resident_bytes(), CPU_LIBRARIES_BYTES) + CPU_SLACK_BYTES


def check_stage(stage: str, model_dir: str | Path, policy, *, weights: str, batch: int = 1,
                seq: int = 1, lora: dict | None = None, training: bool = False,
                checkpointing: bool = False, offload: bool = False, optimizer: str = "",
                remedy: str = "", bits: float | None = None, shards: int = 1) -> dict:
    """The estimate of a stage that loads the checkpoint in `model_dir` on the job's device,
    with the job's dtypes (policy.py), checked (`check`). Returns what provenance records.
    `shards`: a training's FSDP ranks (rank_peak)."""
    shapes = Shapes.from_checkpoint(model_dir)
    unknown = [k for k in ("hidden", "layers", "vocab", "heads") if not getattr(shapes, k)]
    if unknown:  # an architecture whose config names them otherwise: no estimate, no refusal
        log.warning("no memory estimate of %s: %s/config.json gives no %s", stage, model_dir,
                    ", ".join(unknown))
        return {"stage": stage, "skipped": f"config.json gives no {', '.join(unknown)}"}
    compute = 2 if policy.bf16 else 4  # policy.compute_dtype("auto"): bf16 on CUDA
    result = rank_peak(stage, shapes, shards=shards, weights=weights, compute_bytes=compute,
                      fp_bytes=compute, batch=batch, seq=seq, lora=lora, training=training,
                      checkpointing=checkpointing, efficient_attention=policy.cuda,
                      optimizer=optimizer or "adamw_torch", bits=bits,
                      baseline=0 if policy.cuda else cpu_baseline())
    fixes = remedy or "a GPU with more memory, or fewer tokens per batch"
    return check(result, policy.device, fixes, offload=offload and weights == "full")


OFFLOAD_RESERVE = 0.25  # of the GPU's free memory kept for activations when weights offload


def offload_plan(weights_bytes: int, gpu_free: int, cpu_available: int) -> dict | None:
    """accelerate's placement for a full-precision model that does not fit its GPU (scoring,
    perplexity, the merge check: no training): as many layers on the GPU as leave
    OFFLOAD_RESERVE free, the rest in RAM. None when it fits, or when even both do not hold it."""
    budget = int(gpu_free * (1 - OFFLOAD_RESERVE))
    if weights_bytes <= budget or weights_bytes > budget + int(cpu_available * HEADROOM):
        return None
    return {"gpu": budget, "cpu": int(cpu_available * HEADROOM)}


def full_precision_placement(model_dir: str | Path, policy) -> dict:
    """from_pretrained's placement of a full-precision model: the job's device, or on a GPU
    it does not fit, layers split between the GPU and RAM (accelerate's offload, logged)."""
    if not policy.cuda:
        return {"device_map": policy.device}
    import torch

    # full precision, from the headers alone
    weights = Shapes.from_checkpoint(model_dir).params * (2 if policy.bf16 else 4)
    free, _ = available_bytes(policy.device)
    plan = offload_plan(weights, free, available_bytes("cpu")[0] - resident_bytes())
    if plan is None:
        return {"device_map": policy.device}
    index = torch.device(policy.device).index or 0
    log.warning("%s: %.2f GiB of weights on a GPU with %.2f GiB free: %.2f GiB of layers go to "
                "RAM (accelerate offload; slower)", model_dir, weights / GIB, free / GIB,
                max(0, weights - plan["gpu"]) / GIB)
    return {"device_map": "auto", "max_memory": {index: plan["gpu"], "cpu": plan["cpu"]}}
