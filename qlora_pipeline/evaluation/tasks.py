"""A task's test split as an lm-evaluation-harness task (YAML + JSON lines), loaded with
include_path. Prompts are rendered here, with the same prompt format and chat template the
model was trained on, so lm-eval sees exactly what training saw."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..data import formats
from ..errors import InputError

STOP = ["\n"]  # answers are one line; the chat end marker is added when there is one


def lm_eval_name(task: str) -> str:
    return f"qlora_{task}"


def benchmark_kind(records: list[dict]) -> str:
    """Classification tasks (records with choices + label) are scored as multiple choice."""
    return "multiple_choice" if all("choices" in r and "label" in r for r in records) else "generate_until"


def doc(record: dict, fmt: str, tokenizer) -> dict:
    out = {"prompt": formats.prompt_text(record, fmt, tokenizer),
           "answer": formats.answer_text(record, fmt).strip()}
    if "choices" in record:
        out.update(choices=list(record["choices"]), label=int(record["label"]))
    return out


def task_yaml(name: str, data_file: Path, kind: str, max_gen_tokens: int, stop: list[str]) -> dict:
    # Plain column names (not Jinja) for text fields: prompts may contain braces.
    spec = {
        "task": name,
        "dataset_path": "json",
        # Relative to the spec's folder (harness.located_spec makes it absolute for lm-eval):
        # no output stores an absolute path that a later job reads.
        "dataset_kwargs": {"data_files": {"test": data_file.name}},
        "test_split": "test",
        "output_type": kind,
        "doc_to_text": "prompt",
        "target_delimiter": "",  # the prompt already ends where the answer starts
        "metadata": {"version": 1},
    }
    if kind == "multiple_choice":
        spec.update(doc_to_target="label", doc_to_choice="choices",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        spec.update(
            doc_to_target="answer",
            generation_kwargs={"until": stop, "do_sample": False, "max_gen_toks": max_gen_tokens},
            filter_list=[{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                     {"function": "take_first"}]}],
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                          "ignore_case": True, "regexes_to_ignore": [r"\s+$"]}],
        )
    return spec


def write_task(task: str, records: list[dict], fmt: str, tokenizer, out_dir: Path,
               max_gen_tokens: int) -> dict:
    if not records:
        raise InputError(f"task '{task}': the test split is empty; expected at least one "
                         f"example to evaluate on")
    kind = benchmark_kind(records)
    data_file = out_dir / "test.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(doc(record, fmt, tokenizer), ensure_ascii=False) + "\n")
    stop = STOP + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    spec = task_yaml(lm_eval_name(task), data_file, kind, max_gen_tokens, stop)
    (out_dir / f"{lm_eval_name(task)}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False),
                                                        encoding="utf-8")
    return {"name": lm_eval_name(task), "kind": kind, "examples": len(records)}
