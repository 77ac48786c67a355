"""Prompt formats: which fields a record needs, and how it becomes (prompt, answer) tokens.

A record is rendered as segments of token ids, each flagged with whether it carries loss;
the prompt segments are masked from the loss unless `train_on_prompt` is set.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InputError

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
}
OPTIONAL = {"alpaca": ("input",), "chat": (), "completion": ()}
# Kept through every stage so that evaluation can score classification as multiple choice.
PASSTHROUGH = ("choices", "label")
ROLES = {"system", "user", "assistant"}

# The Stanford Alpaca prompt, verbatim, so adapters match what users expect of "alpaca".
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def from_prompt_completion(record: dict, fmt: str) -> dict:
    """Turn a canonical {prompt, completion} record (builtin tasks) into `fmt`'s fields."""
    prompt, answer = record["prompt"], record["completion"]
    if fmt == "alpaca":
        out = {"instruction": prompt, "input": "", "output": answer}
    elif fmt == "chat":
        out = {"messages": [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": answer}]}
    else:
        out = {"prompt": prompt + "\n", "completion": answer}
    return out | {k: record[k] for k in PASSTHROUGH if k in record}


def check_record(record: Any, fmt: str, where: str) -> dict:
    """Validate one record's fields for `fmt`; `where` names the file and line/row."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with fields {REQUIRED[fmt]}, "
                         f"found {type(record).__name__}")
    missing = [f for f in REQUIRED[fmt] if f not in record or record[f] is None]
    if missing:
        raise InputError(
            f"{where}: missing required column(s) {missing} for format '{fmt}' "
            f"(found columns: {sorted(record)}); expected columns {list(REQUIRED[fmt])}, "
            f"or map yours to them with dataset.columns"
        )
    if fmt == "chat":
        _check_messages(record["messages"], where)
    else:
        for field in REQUIRED[fmt] + OPTIONAL[fmt]:
            value = record.get(field, "")
            if value is not None and not isinstance(value, str):
                raise InputError(f"{where}: column '{field}': found {type(value).__name__} "
                                 f"{value!r:.80}, expected text")
    return record


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: column 'messages': found {messages!r:.80}, expected a "
                         f"non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise InputError(f"{where}: messages[{i}]: found {message!r:.80}, expected "
                             f"{{role: system|user|assistant, content: text}}")
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise InputError(f"{where}: 'messages' has no assistant turn to learn from (found "
                         f"roles {roles}); expected at least one message with role 'assistant'")


def clean(record: dict, fmt: str) -> dict:
    """Keep only the fields the format and evaluation use, with optional text fields filled."""
    out = {k: record[k] for k in REQUIRED[fmt] + OPTIONAL[fmt] + PASSTHROUGH if k in record}
    if fmt == "chat":
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in out["messages"]]
    for field in OPTIONAL[fmt]:
        out[field] = out.get(field) or ""
    return out


def prompt_text(record: dict, fmt: str, tokenizer) -> str:
    """The text the model sees before its answer (for evaluation and generation)."""
    if fmt == "alpaca":
        template = ALPACA_INPUT if record.get("input") else ALPACA_NO_INPUT
        return template.format(instruction=record["instruction"], input=record.get("input", ""))
    if fmt == "completion":
        return record["prompt"]
    history = record["messages"]
    last = max(i for i, m in enumerate(history) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(history[:last], tokenize=False,
                                         add_generation_prompt=True)


def answer_text(record: dict, fmt: str) -> str:
    if fmt == "chat":
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    return record[REQUIRED[fmt][-1]]  # the format's last required field: output, completion


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def segments(record: dict, fmt: str, tokenizer) -> list[tuple[list[int], bool]]:
    """Token-id segments of one record, each flagged True when it carries loss."""
    if fmt == "chat":
        return _chat_segments(record["messages"], tokenizer)
    prompt = prompt_text(record, fmt, tokenizer)
    answer = _ids(tokenizer, answer_text(record, fmt), special=False)
    return [(_ids(tokenizer, prompt, special=True), False),
            (answer + [tokenizer.eos_token_id], True)]


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """Every assistant turn carries loss; everything else (system, user, headers) does not.

    The template is rendered for growing prefixes of the conversation; each assistant turn's
    tokens are the difference between the render that ends before it and the one that ends
    after it. This needs the template's renders to be token-prefixes of each other, which we
    check instead of assuming.
    """
    def render(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return _ids(tokenizer, text, special=False)

    full = render(len(messages), False)
    out, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, upto = render(i, True), render(i + 1, False)
        start, end = len(prefix), len(upto)
        if full[:start] != prefix or full[:end] != upto or start < done:
            raise InputError("the tokenizer's chat template does not render conversations "
                             "prefix-consistently; use the 'completion' or 'alpaca' format")
        out += [(full[done:start], False), (full[start:end], True)]
        done = end
    out.append((full[done:], False))  # what follows the last answer (empty: dropped below)
    return [(ids, loss) for ids, loss in out if ids]
