"""The evaluation stages: a task's lm-eval task files, and one variant × task evaluation."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import yaml

from .. import provenance
from ..outputs import atomic_dir, write_json, write_jsonl
from ..runtime import device_description, seed_everything
from ..stages import read_split
from . import harness, tasks

log = logging.getLogger(__name__)


def eval_task_spec(task: str, raw_dir, tokenizer_dir, fmt: str, max_gen_tokens: int,
                   out_dir) -> dict:
    from transformers import AutoTokenizer

    started = provenance.now()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with atomic_dir(out_dir) as tmp:
        info = tasks.write_task(task, read_split(raw_dir, "test"), fmt, tokenizer, tmp,
                                max_gen_tokens)
        # lm-eval reads the data file by absolute path: point it at the final location. Edit
        # the parsed YAML, not its text: YAML quotes, escapes (non-ASCII) or folds some paths.
        spec = tmp / f"{info['name']}.yaml"
        data = yaml.safe_load(spec.read_text(encoding="utf-8"))
        files = data["dataset_kwargs"]["data_files"]
        relative = Path(files["test"]).relative_to(tmp.resolve())
        files["test"] = str(Path(out_dir).resolve() / relative)
        spec.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
        write_json(tmp / "task.json", info)
        write_json(tmp / "provenance.json", provenance.build(
            stage="eval_task_spec", config_slice={"format": fmt, "max_gen_tokens": max_gen_tokens},
            inputs={"raw": raw_dir, "tokenizer": tokenizer_dir}, device="cpu", seed=None,
            started=started))
    log.info("lm-eval task %s", info)
    return info


def evaluate_variant(variant: str, task: str, paths: dict, spec_dir, cfg: dict, seed: int,
                     out_file) -> dict:
    """Score one model variant on the task's own benchmark plus the configured standard ones."""
    started = provenance.now()
    harness.check_benchmarks(cfg["benchmarks"])  # before any model is loaded
    seed_everything(seed)
    names = [tasks.lm_eval_name(task), *cfg["benchmarks"]]
    model, tokenizer = harness.load_variant(variant, paths)
    log.info("evaluating %s on %s", variant, names)
    results = harness.evaluate(model, tokenizer, Path(spec_dir), names, cfg, seed)
    del model
    gc.collect()
    samples = results.pop("samples")
    results.update(variant=variant, task=task)
    out_file = Path(out_file)
    write_json(out_file, results)
    write_jsonl(out_file.parent / "samples.jsonl", samples)
    write_json(out_file.parent / "provenance.json", provenance.build(
        stage="evaluate", config_slice={"variant": variant, "evaluation": cfg},
        inputs={k: v for k, v in paths.items() if v}, device=device_description(), seed=seed,
        started=started))
    log.info("results: %s", results["results"])
    return results


def build_report(results_files: list, adapter_dirs: list, merged_dirs: list,
                 quantization_md, outputs: dict) -> None:
    """scores.csv, report.md and the two plots; each file written whole or not at all."""
    from ..outputs import atomic_file
    from . import report

    frame = report.scores(results_files)
    with atomic_file(outputs["scores"]) as handle:
        frame.to_csv(handle, index=False)
    report.plot_losses(adapter_dirs, Path(outputs["loss_plot"]))
    report.plot_scores(frame, Path(outputs["scores_plot"]))
    text = report.markdown(frame, report.training_rows(adapter_dirs),
                           report.merge_rows(merged_dirs),
                           Path(quantization_md).read_text(encoding="utf-8"))
    with atomic_file(outputs["markdown"]) as handle:
        handle.write(text)
    log.info("\n%s", text)
