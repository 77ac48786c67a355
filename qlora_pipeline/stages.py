"""One function per pipeline stage: read inputs, do the work, write a complete output
directory (with provenance.json) or nothing. Scripts call these; tests call them directly."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

from . import provenance
from .data import sources, tokenize
from .errors import InputError
from .outputs import atomic_dir, atomic_file, read_json, write_json, write_jsonl
from .runtime import device, device_description, seed_everything

log = logging.getLogger(__name__)


def _provenance(tmp: Path, stage: str, config_slice, inputs: dict, seed, started: str) -> None:
    write_json(tmp / "provenance.json", provenance.build(
        stage=stage, config_slice=config_slice, inputs=inputs, device=device_description(),
        seed=seed, started=started))


def read_split(raw_dir: str | Path, split: str) -> list[dict]:
    path = Path(raw_dir) / f"{split}.jsonl"
    # Split on "\n" only: JSON text may hold raw U+2028/U+0085, which splitlines() breaks on.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# ---- data ----------------------------------------------------------------------------------

def fetch_dataset(dataset: dict, fmt: str, out_dir: str | Path, inputs: dict | None = None) -> None:
    started = provenance.now()
    splits = sources.fetch(dataset, fmt)
    with atomic_dir(out_dir) as tmp:
        for split, records in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", records)
        _provenance(tmp, "fetch_dataset", {"dataset": dataset, "format": fmt}, inputs or {},
                    dataset.get("seed"), started)


def tokenize_dataset(raw_dir: str | Path, tokenizer_dir: str | Path, fmt: str, cfg: dict,
                     out_dir: str | Path) -> None:
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    started = provenance.now()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if fmt == "chat" and not tokenizer.chat_template:
        raise InputError(f"format 'chat': the tokenizer in {tokenizer_dir} has no chat "
                         f"template; expected one, or use format 'alpaca' or 'completion'")
    splits, stats = {}, {"format": fmt, **cfg, "splits": {}}
    for split in sources.SPLITS:
        examples, split_stats = tokenize.tokenize_split(read_split(raw_dir, split), fmt,
                                                        tokenizer, cfg)
        if not examples:
            raise InputError(f"{raw_dir}/{split}.jsonl: no example left after tokenization "
                             f"(max_length {cfg['max_length']} cuts every answer); raise "
                             f"tokenize.max_length")
        splits[split] = Dataset.from_list(examples)
        stats["splits"][split] = split_stats
        log.info("%s: %s", split, split_stats)
    with atomic_dir(out_dir) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
        write_json(tmp / "stats.json", stats)
        _provenance(tmp, "tokenize", {"format": fmt, "tokenize": cfg},
                    {"raw": raw_dir, "tokenizer": tokenizer_dir}, None, started)


# ---- models --------------------------------------------------------------------------------

def import_base_model(cfg: dict, out_dir: str | Path) -> None:
    from .models import importer

    started = provenance.now()
    model, tokenizer = importer.load(cfg)
    inputs = {"gguf": importer.gguf_location(cfg)} if cfg["source"] == "gguf" else {}
    if cfg["source"] == "local":
        inputs = {"model": cfg["path"]}
    log.info("%s: %d parameters, %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()), model.dtype)
    with atomic_dir(out_dir) as tmp:
        importer.save(model, tokenizer, tmp)
        _provenance(tmp, "import_base_model", cfg, inputs, None, started)


def _tokenizer_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, dst / path.name)


def _state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def quantize_base_model(base_dir: str | Path, cfg: dict, out_dir: str | Path, seed: int) -> None:
    from .models import numerics, quantize

    started = provenance.now()
    seed_everything(seed)
    base_dir = Path(base_dir)
    model4 = quantize.quantize(base_dir, cfg)
    rows = quantize.layer_errors(model4, _state_dict(base_dir))
    if not rows:
        raise InputError(f"quantization: no linear layer of {base_dir} was quantized "
                         f"(skip_modules {cfg['skip_modules']}); expected at least one")
    # Fails the job (no checkpoint saved) if the 4-bit math is not the configured math.
    checked = numerics.check(model4, quantize.compute_dtype(cfg["compute_dtype"]))
    with atomic_dir(out_dir) as tmp:
        model4.save_pretrained(tmp, safe_serialization=True)
        _tokenizer_files(base_dir, tmp)
        summary = quantize.summarize(rows, cfg, tmp, base_dir)
        write_json(tmp / "quantization.json", {"summary": summary, "layers": rows,
                                               "numerics_check": checked})
        log.info("quantization summary: %s", summary)
        _provenance(tmp, "quantize", cfg, {"base": base_dir}, seed, started)


def quantization_report(base_dir: str | Path, quant_dir: str | Path, tokenized: dict[str, str],
                        max_examples: int, out_dir: str | Path) -> None:
    """Weight-level numbers from the quantize stage plus validation perplexity, fp vs 4-bit."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from .models import perplexity, quantize
    from .report_md import quantization_markdown

    started = provenance.now()
    validation = {task: load_from_disk(path)["validation"] for task, path in tokenized.items()}
    results: dict[str, dict] = {task: {} for task in tokenized}
    loaders = {
        "full_precision": lambda: AutoModelForCausalLM.from_pretrained(
            base_dir, device_map=device(), dtype="auto"),
        "4bit": lambda: quantize.load_quantized(quant_dir),
    }
    for variant, load in loaders.items():  # one model in memory at a time
        model = load()
        for task, examples in validation.items():
            results[task][variant] = perplexity.perplexity(model, examples, max_examples)
            log.info("%s %s: %s", task, variant, results[task][variant])
        del model
        gc.collect()
    report = {**read_json(Path(quant_dir) / "quantization.json"), "perplexity": results}
    # Files, not a directory: the report stage will list them individually.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    with atomic_file(out_dir / "report.md") as handle:
        handle.write(quantization_markdown(report))
    _provenance(out_dir, "quantization_report", {"max_examples": max_examples},
                {"base": base_dir, "quantized": quant_dir, **tokenized}, None, started)
