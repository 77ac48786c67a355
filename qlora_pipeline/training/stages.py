"""The training stages: QLoRA per task, optional full-precision recovery, merge."""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

import torch

from .. import provenance
from ..errors import InputError
from ..outputs import atomic_dir, write_json
from ..runtime import device, device_description, seed_everything
from . import lora, loop, merge

log = logging.getLogger(__name__)


def _inputs_key(config_slice: dict, inputs: dict[str, Path]) -> str:
    """Checkpoints are keyed by the config and the inputs' own provenance: resume only runs
    that would have produced the same adapter."""
    stamps = {k: provenance.checksum(Path(p) / "provenance.json") for k, p in inputs.items()}
    return provenance.config_hash({"config": config_slice, "inputs": stamps})


def use_gradient_checkpointing(train_cfg: dict) -> bool:
    """Gradient checkpointing trades compute for memory: worth it on a GPU, not on a CPU."""
    setting = train_cfg["gradient_checkpointing"]
    return device() == "cuda" if setting == "auto" else bool(setting)


def _bf16() -> bool:
    return device() == "cuda" and torch.cuda.is_bf16_supported()


def _finish(model, tmp: Path, summary: dict, checkpoints: Path, stage: str, config_slice,
            inputs: dict, seed: int, started: str) -> None:
    model.save_pretrained(tmp)
    metrics = checkpoints / "metrics.jsonl"
    if metrics.exists():
        shutil.copy2(metrics, tmp / "metrics.jsonl")
    write_json(tmp / "summary.json", summary)
    write_json(tmp / "provenance.json", provenance.build(
        stage=stage, config_slice=config_slice, inputs=inputs, device=device_description(),
        seed=seed, started=started))


def _checkpoints(root: Path, key: str) -> Path:
    loop.discard_stale_checkpoints(root, keep=key)
    path = root / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_qlora(quant_dir, tokenized_dir, lora_cfg: dict, train_cfg: dict, seed: int,
                out_dir, checkpoint_root) -> dict:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ..models.quantize import load_quantized

    started = provenance.now()
    seed_everything(seed)
    config_slice = {"lora": lora_cfg, "train": train_cfg, "seed": seed}
    inputs = {"base_4bit": Path(quant_dir), "tokenized": Path(tokenized_dir)}
    checkpoints = _checkpoints(Path(checkpoint_root), _inputs_key(config_slice, inputs))

    model = load_quantized(quant_dir)  # the saved 4-bit base: never quantized again here
    expected = lora.expected_trainable(model, lora_cfg) if lora_cfg["target_modules"] else 0
    model = lora.inject(model, lora_cfg, use_gradient_checkpointing(train_cfg))
    params = verify_frozen(model, expected)
    log.info("trainable: %s", params)

    tokenizer = AutoTokenizer.from_pretrained(quant_dir)
    summary = loop.train(model, tokenizer, load_from_disk(str(tokenized_dir)), train_cfg,
                         checkpoints, checkpoints / "metrics.jsonl", seed, bf16=_bf16())
    summary.update(params)
    log.info("summary: %s", summary)
    with atomic_dir(out_dir) as tmp:
        _finish(model, tmp, summary, checkpoints, "train_qlora", config_slice, inputs, seed,
                started)
    shutil.rmtree(checkpoints, ignore_errors=True)  # complete: nothing left to resume
    return summary


def verify_frozen(model, expected_trainable: int) -> dict:
    """Every base weight frozen; exactly the LoRA parameters train (count checked)."""
    not_lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if not_lora:
        raise RuntimeError(f"base parameters left trainable: {not_lora[:5]}")
    params = lora.trainable_summary(model)
    if expected_trainable and params["trainable_params"] != expected_trainable:
        raise RuntimeError(f"trainable parameters {params['trainable_params']} != LoRA "
                           f"arithmetic {expected_trainable}")
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"adapter weights must be float32, found {dtypes}")
    return params


def check_adapter(adapter_dir, key: str) -> None:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{key}: no QLoRA adapter at {adapter_dir} (expected "
                         f"adapter_config.json and adapter_model.safetensors); run the "
                         f"train_qlora stage for this task first")


def recover(base_dir, adapter_dir, tokenized_dir, recovery_cfg: dict, train_cfg: dict,
            seed: int, out_dir, checkpoint_root) -> dict:
    """Continue the QLoRA adapter briefly on the full-precision base it will be merged into."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoTokenizer

    check_adapter(adapter_dir, "recovery")
    started = provenance.now()
    seed_everything(seed)
    cfg = {**train_cfg, "max_steps": recovery_cfg["steps"], "epochs": None,
           "learning_rate": recovery_cfg["learning_rate"], "early_stopping_patience": None,
           "eval_steps": min(train_cfg["eval_steps"], recovery_cfg["steps"])}
    config_slice = {"recovery": recovery_cfg, "train": cfg, "seed": seed}
    inputs = {"base": Path(base_dir), "adapter": Path(adapter_dir),
              "tokenized": Path(tokenized_dir)}
    checkpoints = _checkpoints(Path(checkpoint_root), _inputs_key(config_slice, inputs))

    from ..models.quantize import load_full_precision

    base = load_full_precision(base_dir)
    if use_gradient_checkpointing(cfg):
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()  # frozen embeddings: let gradients reach LoRA
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    lora.keep_adapters_fp32(model)
    params = verify_frozen(model, 0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    summary = loop.train(model, tokenizer, load_from_disk(str(tokenized_dir)), cfg,
                         checkpoints, checkpoints / "metrics.jsonl", seed, bf16=_bf16())
    summary.update(params)
    with atomic_dir(out_dir) as tmp:
        _finish(model, tmp, summary, checkpoints, "recover", config_slice, inputs, seed, started)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def merge_adapter(base_dir, quant_dir, adapter_dir, tokenized_dir, merge_cfg: dict,
                  out_dir, recovered: bool = False) -> dict:
    """Merge the task's final adapter; save the merged model and the merge check."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    check_adapter(adapter_dir, "merge")
    started = provenance.now()
    test = load_from_disk(str(tokenized_dir))["test"]
    prompts = [e["input_ids"] for e in test.select(range(min(merge_cfg["check_examples"],
                                                             len(test))))]
    trained = merge.trained_model_logits(quant_dir, adapter_dir, prompts)
    chosen = merge.resolve_base(merge_cfg["base"], recovered)
    # The other base (if compared) first, so only one merged model is ever in memory and
    # the check file is complete when the output appears.
    others = [k for k in ("full", "dequantized") if k != chosen] if merge_cfg["compare_bases"] else []
    checks = {}
    for kind in others:
        merged, checks[kind] = merge.merge_and_check(kind, base_dir, quant_dir, adapter_dir,
                                                     prompts, trained)
        del merged
        gc.collect()
    merged, checks[chosen] = merge.merge_and_check(chosen, base_dir, quant_dir, adapter_dir,
                                                   prompts, trained)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        write_json(tmp / "merge_check.json", {"chosen": chosen, "recovered": recovered,
                                              "examples": len(prompts), "checks": checks})
        write_json(tmp / "provenance.json", provenance.build(
            stage="merge", config_slice=merge_cfg,
            inputs={"base": base_dir, "base_4bit": quant_dir, "adapter": adapter_dir},
            device=device_description(), seed=None, started=started))
    return checks
