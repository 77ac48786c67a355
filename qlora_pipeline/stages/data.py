"""Stages of rules/data.smk: fetch each task's examples, tokenize them."""

from __future__ import annotations

import logging

from ..data import sources
from ..core.errors import InputError
from ..core.files import write_json, write_jsonl
from ..core.policy import Policy
from . import Input, Inputs, Output

log = logging.getLogger(__name__)


def fetch_dataset(*, raw: Output, dataset: dict, format: str, policy: Policy,
                  files: Inputs = ()) -> None:
    """The task's train/validation/test splits as JSON lines. `files`: a local source's files
    (declared inputs, so that editing one reruns the task)."""
    for split, records in sources.fetch(dataset, format).items():
        write_jsonl(raw / f"{split}.jsonl", records)


def tokenize(*, raw: Input, base: Input, tokenized: Output, format: str, tokenize: dict,
             policy: Policy) -> None:
    """Each split tokenized with the base model's tokenizer (prompt tokens masked from the
    loss unless tokenize.train_on_prompt), saved as a datasets DatasetDict, plus stats.json."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from ..data.tokenize import tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(base)
    if format == "chat" and not tokenizer.chat_template:
        raise InputError(f"format 'chat': the tokenizer in {base} has no chat template; "
                         f"expected one, or use format 'alpaca' or 'completion'")
    splits, stats = {}, {"format": format, **tokenize, "splits": {}}
    for split in sources.SPLITS:
        examples, split_stats = tokenize_split(sources.read_split(raw, split), format,
                                               tokenizer, tokenize, packable=split == "train",
                                               where=f"{raw}/{split}.jsonl")
        if not examples:
            raise InputError(f"{raw}/{split}.jsonl: no example left after tokenization "
                             f"(max_length {tokenize['max_length']} cuts every answer); "
                             f"raise tokenize.max_length")
        splits[split] = Dataset.from_list(examples)
        stats["splits"][split] = split_stats
        log.info("%s: %s", split, split_stats)
    DatasetDict(splits).save_to_disk(str(tokenized))
    write_json(tokenized / "stats.json", stats)
