"""QLoRA training throughput and peak memory of a Llama-3-8B-shaped model on one GPU.

    python benchmarks/gpu_train.py [--dry-run] [--out FILE.json] [--steps N] [--warmup N]

Issue 12, item 5 (benchmarks/gpu.sh calls this). A random-init Llama-3-8B shape (32 layers,
hidden 4096, GQA 32/8 heads, vocab 128256, rope theta 500000) quantized to NF4 with double
quantization, LoRA r 16 on every linear layer (the pipeline's own lora.inject: PEFT's
prepare_model_for_kbit_training, then get_peft_model), gradient checkpointing, paged AdamW
8-bit, bf16 autocast; batch 2 at sequence 2048. Three runs on the same model:

- full: every row one 2048-token sequence (the shape of torchtune's published figure);
- padded: examples of widely varying length, each batch right-padded to its longest;
- packed: the same examples concatenated into 2048-token rows with per-example position ids
  (the pipeline's tokenize.pack and training Collator); transformers turns those into a
  block-diagonal causal mask (sdpa) or flash-attention's varlen path where it is installed.

tokens/s counts non-padding tokens only, so padded and packed compare as work done. The
`--dry-run` scale runs the same code on the CPU in seconds (float32, the bitsandbytes CPU
backend, plain AdamW where paged optimizers need CUDA), so CI keeps this script from rotting.

Nothing is downloaded: the weights are random (speed does not depend on their values) and
the token ids are drawn at random.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# torchtune's README (Llama-3.1-8B QLoRA, one RTX 4090: batch 2, packed to 2048, activation
# checkpointing, torch.compile). Quoted, never measured here.
PUBLISHED = {
    "label": "torchtune, Llama-3.1-8B QLoRA, 1x RTX 4090, packed 2048, compiled "
             "(published, not measured here)",
    "tokens_per_s": 2413.0,
    "peak_memory_gib": 7.4,
}

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 256}

# LoRA as lora.inject takes it. r 16 on all linear layers (the setting); alpha 2r and
# no dropout, as torchtune's QLoRA recipe, so the comparison is of the same work.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "init": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None}
OPTIMIZER = "paged_adamw_8bit"  # the pipeline's default; Policy maps it to AdamW on a CPU
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0  # the pipeline's default: clipping is part of every step it takes
SEED = 0


@dataclass(frozen=True)
class Scale:
    name: str
    model: dict
    seq: int
    batch: int
    warmup: int
    steps: int
    min_length: int  # shortest example of the padded/packed runs; the longest is `seq`


FULL = Scale("llama-3-8b", LLAMA3_8B, seq=2048, batch=2, warmup=3, steps=10, min_length=32)
DRY = Scale("dry-run", TINY, seq=64, batch=2, warmup=1, steps=2, min_length=4)


def policy_for(dry_run: bool):
    """The pipeline's runtime policy (device, bf16, optimizer mapping); the dry run is the
    CPU's policy whatever the machine has."""
    from qlora_pipeline.core.policy import Policy

    if dry_run:
        return Policy("cpu", f"cpu:{os.cpu_count()} cores", False, torch.get_num_threads())
    policy = Policy.detect()
    if not policy.cuda:
        raise SystemExit("gpu_train: no CUDA device visible; use --dry-run on a CPU")
    return policy


def attention_implementation(policy) -> str:
    """flash-attention 2 (varlen for packed rows) where installed on a GPU, else sdpa."""
    if policy.cuda:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# --- the model: built layer by layer, each layer quantized as soon as it exists ------------

def materialize(module, device, std: float) -> None:
    """Allocate a meta module's tensors on `device` and initialise them as Llama does
    (normal(0, std) for linear and embedding weights, ones for the RMSNorm scales)."""
    module.to_empty(device=device)
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(sub.weight, std=std)
        elif getattr(sub, "weight", None) is not None and sub.weight.dim() == 1:
            torch.nn.init.ones_(sub.weight)


def quantize_linears(module, compute_dtype) -> None:
    """Swap every nn.Linear under `module` for bitsandbytes' NF4 Linear4bit with double
    quantization: what transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) does while it loads a
    checkpoint (replace_with_bnb_linear, then Params4bit quantizes on its way to the device)."""
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                  bias=linear.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.uint8,
                                         module=q).to(linear.weight.device)
            if linear.bias is not None:
                q.bias = linear.bias
            setattr(parent, name, q)


def build_model(scale: Scale, policy):
    """The NF4 model on the device, never whole in 16-bit: the shapes are laid out on the meta
    device, then each decoder layer is allocated, initialised and quantized in turn (16 GB of
    bf16 weights would otherwise be made, on the host, then copied and quantized)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_pipeline.models.methods import bnb4

    compute_dtype = policy.compute_dtype("auto")
    config = LlamaConfig(**scale.model, use_cache=False,
                         attn_implementation=attention_implementation(policy))
    check_rope_theta(config, scale.model["rope_theta"])
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(compute_dtype)
    device = torch.device(policy.device)
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(part, device, config.initializer_range)
    # Rotary frequencies are computed, not parameters: build the module again on the device
    # (its constructor takes a `device` argument in some transformers versions, not in others).
    with device:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for layer in model.model.layers:
        materialize(layer, device, config.initializer_range)
        quantize_linears(layer, compute_dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.is_loaded_in_4bit = True  # as transformers' 4-bit loader marks it; PEFT reads it
    return bnb4.single_path(model)


def check_rope_theta(config, expected: float) -> None:
    """transformers 5 moved rope_theta into rope_parameters; make sure it was taken."""
    params = getattr(config, "rope_parameters", None) or {}
    found = params.get("rope_theta", getattr(config, "rope_theta", None))
    if found != expected:
        raise RuntimeError(f"rope theta {found}, expected {expected}")


def add_lora(model):
    """(model, trainable parameters): the pipeline's own injection (training/lora.py) with
    gradient checkpointing, and its check that exactly the LoRA weights train, in float32."""
    from qlora_pipeline.training import lora, packing

    expected = lora.expected_trainable(model, LORA)
    model = lora.inject(model, LORA, gradient_checkpointing=True)
    model.config.use_cache = False  # with a KV cache, transformers ignores packed positions
    return model, lora.verify_frozen(model, expected)


# --- data: random token ids, lengths widely varying ----------------------------------------

def tokenizer_for_padding():
    """The smallest tokenizer the pipeline's Collator accepts (it only pads: id 0, right)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                   padding_side="right")


def examples(count_tokens: int, scale: Scale, generator) -> list[dict]:
    """Examples of log-uniform length in [min_length, seq] (most short, a few long, as in
    instruction data) until they hold `count_tokens` tokens. The first token's label is -100,
    as a prompt's would be, so no loss crosses from one packed example into the next."""
    vocab = scale.model["vocab_size"]
    low, high = math.log(scale.min_length), math.log(scale.seq)
    out, total = [], 0
    while total < count_tokens:
        u = float(torch.rand((), generator=generator))
        length = int(math.exp(low + u * (high - low)))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
        total += length
    return out


def full_rows(rows: int, scale: Scale, generator) -> list[dict]:
    ids = torch.randint(3, scale.model["vocab_size"], (rows, scale.seq), generator=generator)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def batches(rows: list[dict], batch_size: int, tokenizer, device) -> list[tuple[dict, int]]:
    """(batch, its non-padding tokens): collated by the pipeline's Collator (padding, or
    position ids for packed rows) and moved to the device ahead of the timed loop, so that
    only training steps are timed."""
    from qlora_pipeline.training.packing import Collator

    collate = Collator(tokenizer)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = [{k: list(v) for k, v in row.items()} for row in rows[start:start + batch_size]]
        tokens = sum(len(row["input_ids"]) for row in chunk)
        out.append(({k: v.to(device) for k, v in collate(chunk).items()}, tokens))
    return out


def workloads(scale: Scale, tokenizer, device) -> tuple[dict[str, tuple[list, list]], dict]:
    """({name: (warm-up batches, timed batches)}, one packed row for the isolation check).
    padded and packed time the same examples: as many as fill `steps` packed batches; padded
    takes as many steps as it needs for them."""
    from qlora_pipeline.data.tokenize import pack

    generator = torch.Generator().manual_seed(SEED)
    capacity = scale.batch * scale.seq  # tokens in one packed batch
    warm = examples(scale.warmup * capacity, scale, generator)
    timed = examples(scale.steps * capacity, scale, generator)
    timed = trim_to_packed(timed, scale)

    def make(rows_warm, rows_timed):
        return (batches(rows_warm, scale.batch, tokenizer, device),
                batches(rows_timed, scale.batch, tokenizer, device))

    rows = full_rows(scale.batch * (scale.warmup + scale.steps), scale, generator)
    warm_rows = scale.batch * scale.warmup
    packed = pack(timed, scale.seq)
    return {
        "full": make(rows[:warm_rows], rows[warm_rows:]),
        "padded": make(warm[:warm_rows], timed),
        "packed": make(pack(warm, scale.seq)[:warm_rows], packed),
    }, packed[0]


def trim_to_packed(rows: list[dict], scale: Scale) -> list[dict]:
    """The leading examples that pack into at most `steps` full batches of rows."""
    from qlora_pipeline.data.tokenize import pack

    while len(pack(rows, scale.seq)) > scale.steps * scale.batch:
        rows = rows[:-1]
    return rows


# --- one run: warm-up steps, then timed steps ----------------------------------------------

def make_optimizer(model, policy):
    """The optimizer class and arguments the pipeline's Trainer would build for this name."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/tmp/gpu-bench-unused", report_to="none",
                             optim=policy.optimizer(OPTIMIZER), learning_rate=LEARNING_RATE,
                             use_cpu=not policy.cuda)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs), params


def step(model, batch: dict, optimizer, params, policy) -> torch.Tensor:
    """One optimizer step as the Trainer takes it (bf16 autocast on a GPU, clipping). A plain
    loop rather than Trainer: the GPU machine has no `datasets`, and it lets the timer bracket
    exactly the steps (a Trainer run adds its data loader and callbacks)."""
    with torch.autocast(policy.device, dtype=torch.bfloat16, enabled=policy.bf16):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(policy) -> None:
    if policy.cuda:
        torch.cuda.synchronize()


def reset_memory(policy) -> None:
    gc.collect()
    if policy.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(policy) -> dict:
    """Peak GPU memory (allocated by tensors; reserved by the caching allocator). Paged
    optimizer states live in CUDA managed memory, which neither counts. On the CPU: the
    process's peak resident set, the only peak there is (it never resets between runs)."""
    if policy.cuda:
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "memory_source": "torch.cuda.max_memory_allocated / max_memory_reserved"}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_reserved_gib": None, "memory_source": "process max RSS (CPU)"}


def run(name: str, model, warm: list, timed: list, policy) -> dict:
    """Warm-up steps (the optimizer's state, kernels' first launches), then the timed steps
    between two device synchronisations; a fresh optimizer and memory peak per run."""
    reset_memory(policy)
    optimizer, params = make_optimizer(model, policy)
    for batch, _ in warm:
        step(model, batch, optimizer, params, policy)
    sync(policy)
    start = time.perf_counter()
    # Losses stay on the device until the end: reading each would synchronise every step.
    losses = [step(model, batch, optimizer, params, policy) for batch, _ in timed]
    sync(policy)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu()
    if not torch.isfinite(losses).all():
        raise RuntimeError(f"{name}: non-finite loss {losses.tolist()}")
    tokens = sum(count for _, count in timed)
    positions = sum(batch["input_ids"].numel() for batch, _ in timed)
    del optimizer
    return {"name": name, "warmup_steps": len(warm), "steps": len(timed), "seconds": seconds,
            "seconds_per_step": seconds / len(timed), "tokens": tokens, "positions": positions,
            "padding_pct": 100 * (1 - tokens / positions), "tokens_per_s": tokens / seconds,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            **peak_memory(policy)}



def isolation(model, row: dict, policy) -> dict:
    """The pipeline's check that packed examples do not attend to each other, on this
    machine's attention path: each example's loss in the packed row against its loss alone,
    under the training steps' autocast (so a bf16 tolerance where they compute in bf16).
    Recorded, not raised: a failure is a finding about the attention path. With random
    weights attention is nearly uniform, so this probe is weaker than on a trained model."""
    from qlora_pipeline.core.errors import InputError
    from qlora_pipeline.training.packing import check_isolation

    try:
        with torch.autocast(policy.device, dtype=torch.bfloat16, enabled=policy.bf16):
            return {"ok": True, **check_isolation(model, row)}
    except InputError as err:
        return {"ok": False, "message": str(err)}


# --- the record ----------------------------------------------------------------------------

def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def summary(rows: list[dict], scale: Scale, model, params: dict, policy, checked: dict) -> dict:
    from qlora_pipeline.core import machine

    by_name = {row["name"]: row for row in rows}
    return {
        "scale": asdict(scale), "lora": LORA, "parameters": params,
        "optimizer": policy.optimizer(OPTIMIZER),
        "quantization": {"method": "nf4", "double_quant": True, "blocksize": 64,
                         "compute_dtype": str(policy.compute_dtype("auto"))},
        "attention": model.config._attn_implementation, "gradient_checkpointing": True,
        "device": policy.device_name, "machine": machine.facts(), "versions": versions(),
        "rows": rows, "packed_isolation": checked,
        "packed_vs_padded_tokens_per_s": (by_name["packed"]["tokens_per_s"]
                                          / by_name["padded"]["tokens_per_s"]),
        "published": PUBLISHED,
    }


def markdown(result: dict) -> str:
    scale = result["scale"]
    shape = f"batch {scale['batch']} × {scale['seq']}"
    what = {"full": f"full rows ({shape}, one sequence per row)",
            "padded": f"padded ({shape} max, varying lengths)",
            "packed": f"packed ({shape}, position ids, {result['attention']})"}
    title = (f"QLoRA, {scale['name']} NF4 + double quant, LoRA r {LORA['r']} all-linear, "
             f"{result['optimizer']}, gradient checkpointing; {result['device']}")
    header = ("| run | tokens/s (non-padding) | padding % | peak GiB | peak reserved GiB | "
              "s/step | steps |")
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        reserved = row["peak_reserved_gib"]
        lines.append(f"| {what[row['name']]} | {row['tokens_per_s']:,.0f} | "
                     f"{row['padding_pct']:.1f} | {row['peak_memory_gib']:.2f} | "
                     f"{'–' if reserved is None else f'{reserved:.2f}'} | "
                     f"{row['seconds_per_step']:.3f} | {row['steps']} |")
    published = result["published"]
    lines.append(f"| {published['label']} | {published['tokens_per_s']:,.0f} | – | "
                 f"{published['peak_memory_gib']} | – | – | – |")
    ratio = (f"packed / padded tokens/s: {result['packed_vs_padded_tokens_per_s']:.2f}×; "
             f"packed isolation: {isolation_text(result['packed_isolation'])}")
    lines += ["", f"peak GiB: {result['rows'][0]['memory_source']}.", ratio]
    return "\n".join(lines) + "\n"


def isolation_text(checked: dict) -> str:
    if not checked["ok"]:
        return "FAILED: " + checked["message"]
    return (f"ok ({checked['examples']} examples, largest loss gap "
            f"{checked['max_loss_gap']:.1e}, tolerance {checked['tolerance']:g})")


def output_path(given: str | None, device_name: str = "gpu_bench.json",
                local_name: str = "gpu.json") -> Path:
    """--out, else $OUT/<device_name> (the device tool's folder), else results/benchmarks."""
    if given:
        return Path(given)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / device_name
    return REPO / "results" / "benchmarks" / local_name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        default=os.environ.get("GPU_BENCH_DRY") == "1",
                        help="tiny model on the CPU (CI); also GPU_BENCH_DRY=1")
    parser.add_argument("--out", help="JSON path (default: $OUT/gpu_bench.json when $OUT is "
                                      "set, else results/benchmarks/gpu.json)")
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup", type=int, help="warm-up steps per run")
    args = parser.parse_args(argv)
    scale = DRY if args.dry_run else FULL
    scale = Scale(**{**asdict(scale), "steps": args.steps or scale.steps,
                     "warmup": args.warmup if args.warmup is not None else scale.warmup})
    policy = policy_for(args.dry_run)
    start = time.perf_counter()
    model, params = add_lora(build_model(scale, policy))
    print(f"gpu_train: {scale.name} model ready in {time.perf_counter() - start:.1f} s on "
          f"{policy.device_name}", flush=True)
    tokenizer = tokenizer_for_padding()
    work, probe = workloads(scale, tokenizer, torch.device(policy.device))
    checked = isolation(model, probe, policy)
    rows = []
    for name, (warm, timed) in work.items():
        rows.append(run(name, model, warm, timed, policy))
        print(f"gpu_train: {name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, peak "
              f"{rows[-1]['peak_memory_gib']:.2f} GiB", flush=True)
    result = summary(rows, scale, model, params, policy, checked)
    path = output_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    path.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table + f"\nwritten: {path} and {path.with_suffix('.md')}", flush=True)
    return result


if __name__ == "__main__":
    main()
