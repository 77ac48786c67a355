"""Stages of rules/data.smk: fetch each task's examples, tokenize them."""

from __future__ import annotations

import logging

from ..data import sources
from ..errors import InputError
from ..outputs import stage_outputs, write_json, write_jsonl
from ..policy import Policy

log = logging.getLogger(__name__)


def fetch_dataset(*, raw, dataset: dict, format: str, policy: Policy, files=()) -> None:
    """The task's train/validation/test splits as JSON lines. `files`: a local source's files
    (declared inputs, so that editing one reruns the task)."""
    inputs = {f"file{i}": path for i, path in enumerate(files)}
    with stage_outputs("fetch_dataset", {"raw": raw}, config={"dataset": dataset, "format": format},
                       inputs=inputs, policy=policy, seed=dataset.get("seed")) as out:
        for split, records in sources.fetch(dataset, format).items():
            write_jsonl(out["raw"] / f"{split}.jsonl", records)


def tokenize(*, raw, base, tokenized, format: str, tokenize: dict, policy: Policy) -> None:
    """Each split tokenized with the base model's tokenizer (prompt tokens masked from the
    loss unless tokenize.train_on_prompt), saved as a datasets DatasetDict, plus stats.json."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from ..data.tokenize import tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(base)
    if format == "chat" and not tokenizer.chat_template:  # refused before any output exists
        raise InputError(f"format 'chat': the tokenizer in {base} has no chat template; "
                         f"expected one, or use format 'alpaca' or 'completion'")
    with stage_outputs("tokenize", {"tokenized": tokenized},
                       config={"format": format, "tokenize": tokenize},
                       inputs={"raw": raw, "tokenizer": base}, policy=policy) as out:
        splits, stats = {}, {"format": format, **tokenize, "splits": {}}
        for split in sources.SPLITS:
            examples, split_stats = tokenize_split(sources.read_split(raw, split), format,
                                                   tokenizer, tokenize, packable=split == "train")
            if not examples:
                raise InputError(f"{raw}/{split}.jsonl: no example left after tokenization "
                                 f"(max_length {tokenize['max_length']} cuts every answer); "
                                 f"raise tokenize.max_length")
            splits[split] = Dataset.from_list(examples)
            stats["splits"][split] = split_stats
            log.info("%s: %s", split, split_stats)
        DatasetDict(splits).save_to_disk(str(out["tokenized"]))
        write_json(out["tokenized"] / "stats.json", stats)
