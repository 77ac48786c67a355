"""A task's test split as an lm-evaluation-harness task (YAML + JSON lines), loaded with
include_path. Prompts are rendered here, with the same prompt format and chat template the
model was trained on, so lm-eval sees exactly what training saw."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..data import formats
from ..core.errors import InputError
from ..core.layout import lm_eval_name

STOP = ["\n"]  # answers are one line; the chat end marker is added when there is one
# The task schema's `scoring` defaults: strict exact match but for case and trailing space.
DEFAULT_SCORING = {"metric": "exact_match", "ignore_case": True, "ignore_punctuation": False,
                   "extract": None}


def doc(record: dict, fmt: str, tokenizer) -> dict:
    out = {"prompt": formats.prompt_text(record, fmt, tokenizer),
           "answer": formats.answer_text(record, fmt).strip()}
    if "choices" in record:
        out.update(choices=list(record["choices"]), label=int(record["label"]))
    return out


def task_yaml(name: str, data_file: Path, kind: str, max_gen_tokens: int, stop: list[str],
              scoring: dict | None = None) -> dict:
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
        filters, metrics = generation_scoring({**DEFAULT_SCORING, **(scoring or {})})
        spec.update(
            doc_to_target="answer",
            generation_kwargs={"until": stop, "do_sample": False, "max_gen_toks": max_gen_tokens},
            filter_list=filters, metric_list=metrics)
    return spec


def generation_scoring(scoring: dict) -> tuple[list, list]:
    """lm-eval's filter_list and metric_list for the task's `scoring` block: leading space
    removed, the `extract` pattern's first match if one is set, the first answer; then exact
    match (with its case and punctuation options) or a sacrebleu metric over the test set."""
    steps = [{"function": "remove_whitespace"}]
    if scoring["extract"]:
        steps.append({"function": "regex", "regex_pattern": scoring["extract"],
                      "group_select": 0, "fallback": "[no match]"})
    steps.append({"function": "take_first"})
    filters = [{"name": "extract" if scoring["extract"] else "strip", "filter": steps}]
    if scoring["metric"] == "exact_match":
        metrics = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                    "ignore_case": scoring["ignore_case"], "regexes_to_ignore": [r"\s+$"],
                    **({"ignore_punctuation": True} if scoring["ignore_punctuation"] else {})}]
    else:  # chrf, bleu: corpus-level, lm-eval's aggregation of the same name
        metrics = [{"metric": scoring["metric"], "aggregation": scoring["metric"],
                    "higher_is_better": True}]
    return filters, metrics


def write_task(task: str, records: list[dict], fmt: str, tokenizer, out_dir: Path,
               max_gen_tokens: int, scoring: dict | None = None) -> dict:
    if not records:
        raise InputError(f"task '{task}': the test split is empty; expected at least one "
                         f"example to evaluate on")
    # Classification tasks (records with choices + label) are scored as multiple choice.
    kind = "multiple_choice" if all("choices" in r and "label" in r for r in records) \
        else "generate_until"
    if kind == "multiple_choice" and {**DEFAULT_SCORING, **(scoring or {})} != DEFAULT_SCORING:
        raise InputError(f"task '{task}': key 'scoring': found {scoring}, but its records have "
                         f"choices and a label, so it is scored as multiple choice (accuracy); "
                         f"expected no scoring settings (they apply to generation tasks)")
    data_file = out_dir / "test.jsonl"
    data_file.write_text("".join(json.dumps(doc(record, fmt, tokenizer), ensure_ascii=False) + "\n"
                                 for record in records), encoding="utf-8")
    stop = STOP + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    spec = task_yaml(lm_eval_name(task), data_file, kind, max_gen_tokens, stop, scoring)
    (out_dir / f"{lm_eval_name(task)}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False),
                                                        encoding="utf-8")
    return {"name": lm_eval_name(task), "kind": kind, "examples": len(records)}
