"""The tokenization stage: records -> input_ids + labels, with prompt tokens masked (-100)."""

from __future__ import annotations

import logging

import numpy as np

from ..core.errors import InputError
from . import formats

log = logging.getLogger(__name__)
IGNORE = -100  # the label value transformers' loss skips


def tokenize_record(record: dict, fmt: str, tokenizer, max_length: int,
                    train_on_prompt: bool) -> tuple[dict, bool, bool]:
    """One example as {input_ids, labels}; also whether it had to be truncated, and whether
    any answer token survives the truncation."""
    ids, labels, answer = [], [], []
    for segment, carries_loss in formats.segments(record, fmt, tokenizer):
        ids += segment
        labels += segment if (carries_loss or train_on_prompt) else [IGNORE] * len(segment)
        answer += [carries_loss] * len(segment)
    example = {"input_ids": ids[:max_length], "labels": labels[:max_length]}
    return example, len(ids) > max_length, any(answer[:max_length])


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy packing: concatenate whole examples into sequences of at most max_length tokens.

    Examples are not split across sequences, so no answer loses its prompt. Each example's
    position ids restart at 0: training turns them into a block-diagonal causal mask, so that
    no example attends to another (training/packing.py).
    """
    packed = []
    for example in examples:
        if not packed or len(packed[-1]["input_ids"]) + len(example["input_ids"]) > max_length:
            packed.append({"input_ids": [], "labels": [], "position_ids": []})
        packed[-1]["input_ids"] += example["input_ids"]
        packed[-1]["labels"] += example["labels"]
        packed[-1]["position_ids"] += list(range(len(example["input_ids"])))
    return packed


def tokenize_split(records: list[dict], fmt: str, tokenizer, cfg: dict,
                   packable: bool = True, where: str = "records") -> tuple[list[dict], dict]:
    """Tokenize one split; returns the examples and that split's statistics. `packable`:
    whether tokenize.packing applies (the train split only: validation and test stay one
    example per row, as the perplexity report and the merge check read them). `where`: the
    split's file, named with the line of a record the tokenizer cannot render."""
    examples, truncated = [], 0
    for line, record in enumerate(records, start=1):
        try:
            example, was_truncated, answer_left = tokenize_record(
                record, fmt, tokenizer, cfg["max_length"], cfg["train_on_prompt"])
        except InputError as err:
            raise InputError(f"{where}: line {line}: {err}") from None
        truncated += was_truncated
        # Dropped when truncation cut the whole answer: nothing left to learn from (with
        # train_on_prompt too, where the labels alone would not show it).
        if answer_left:
            examples.append(example)
    lengths = np.array([len(e["input_ids"]) for e in examples] or [0])
    loss_tokens = sum(sum(label != IGNORE for label in e["labels"]) for e in examples)
    stats = {
        "examples": len(examples),
        "truncated": truncated,
        "truncated_pct": round(100 * truncated / max(len(records), 1), 2),
        "dropped_no_answer_left": len(records) - len(examples),  # the rest are kept
        # The smallest observed length that covers q% of the examples (int() of the
        # interpolated value could name a length no example has, and cover fewer than q%).
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf"))
                               for q in (50, 90, 99)}
        | {"max": int(lengths.max())},
        "tokens": int(lengths.sum()),
        "loss_tokens_pct": round(100 * loss_tokens / max(int(lengths.sum()), 1), 2),
    }
    if cfg["packing"] and packable:
        examples = pack(examples, cfg["max_length"])
        stats["packed_sequences"] = len(examples)
    for example in examples:
        example["attention_mask"] = [1] * len(example["input_ids"])
    return examples, stats
