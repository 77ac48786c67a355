"""Prompt formats: which fields a record needs, and how it becomes (prompt, answer) tokens.

A record is rendered as segments of token ids, each flagged with whether it carries loss;
the prompt segments are masked from the loss unless `train_on_prompt` is set.

A chat conversation is written either as transformers' messages ({role, content}, with
`tool_calls` on an assistant message and role `tool` for a result) or as ShareGPT's turns
({from, value}), which are read into messages here: ShareGPT is a spelling of chat, not a
format of its own, so everything after reading (templates, loss, evaluation, qlora-chat) is
chat's.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError

from ..core.errors import InputError

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
}
OPTIONAL = {"alpaca": ("input",), "chat": ("tools",), "completion": ()}
# Kept through every stage so that evaluation can score classification as multiple choice.
PASSTHROUGH = ("choices", "label")
ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT's speakers (LLaMA-Factory's function_call/observation included) as chat roles.
SHAREGPT = {"human": "user", "gpt": "assistant", "system": "system",
            "function_call": "assistant", "observation": "tool", "tool": "tool"}
EXPECTED_MESSAGE = (f"{{role: {'|'.join(sorted(ROLES))}, content: text}} or ShareGPT's "
                    f"{{from: {'|'.join(SHAREGPT)}, value: text}}")

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
    if fmt == "chat":  # `tools` kept only where there are some: other records stay as they were
        tools = _tools(record.get("tools"), where)
        rest = {k: v for k, v in record.items() if k != "tools"}
        return rest | {"messages": _messages(record["messages"], where)} | (
            {"tools": tools} if tools else {})
    for field in REQUIRED[fmt] + OPTIONAL[fmt]:
        value = record.get(field, "")
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: column '{field}': found {type(value).__name__} "
                             f"{value!r:.80}, expected text")
    return record


def _messages(messages: Any, where: str) -> list[dict]:
    """The conversation as checked chat messages (ShareGPT turns read as messages)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: column 'messages': found {messages!r:.80}, expected a "
                         f"non-empty list of {EXPECTED_MESSAGE}")
    out = [_message(message, f"{where}: messages[{i}]") for i, message in enumerate(messages)]
    for i, message in enumerate(out):
        # Templates render a result as the answer to the call before it (some look it up).
        if message["role"] == "tool" and (i == 0 or not ("tool_calls" in out[i - 1]
                                                         or out[i - 1]["role"] == "tool")):
            raise InputError(f"{where}: messages[{i}]: a tool result (role 'tool') with no "
                             f"tool call before it; expected it right after an assistant's "
                             f"tool call (ShareGPT: function_call) or another result")
    if not any(m["role"] == "assistant" for m in out):
        roles = [m["role"] for m in out]
        raise InputError(f"{where}: 'messages' has no assistant turn to learn from (found "
                         f"roles {roles}); expected at least one message with role 'assistant'")
    return out


def _tools(tools: Any, where: str) -> list[dict]:
    """A conversation's function definitions, for the template (LLaMA-Factory writes JSON)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: column 'tools': {tools!r:.60} is not JSON ({err.msg}); "
                             f"expected a list of function definitions") from None
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(tool, dict) for tool in tools)):
        raise InputError(f"{where}: column 'tools': found {tools!r:.80}, expected a list of "
                         f"function definitions ({{name, description, parameters}})")
    return tools or []


def _message(message: Any, where: str) -> dict:
    """One message as {role, content} (+ tool_calls); a ShareGPT turn is translated."""
    if (isinstance(message, dict) and message.get("from") in SHAREGPT
            and isinstance(message.get("value"), str)):
        key = "tool_calls" if message["from"] == "function_call" else "content"
        message = {"role": SHAREGPT[message["from"]], "content": "", key: message["value"]}
    valid = isinstance(message, dict) and message.get("role") in ROLES
    calls = message.get("tool_calls") if valid else None  # None or [] where there is none
    if calls not in (None, []):
        valid, calls = message["role"] == "assistant", _calls(calls, where)
    content = message.get("content") if valid else None
    if valid and calls and content is None:  # OpenAI writes a call's content as null
        content = ""
    if not isinstance(content, str):
        raise InputError(f"{where}: found {message!r:.80}, expected {EXPECTED_MESSAGE}")
    # Rebuilt: only what templates read (a hub dataset's rows carry None for absent keys).
    return {"role": message["role"], "content": content} | (
        {"tool_calls": calls} if calls else {})


def _calls(calls: Any, where: str) -> list[dict]:
    """Tool calls as chat templates read them, [{type: function, function: {name, arguments}}],
    from that form or ShareGPT's ({name, arguments}, one or a list, as JSON text)."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: tool call {calls!r:.60} is not JSON ({err.msg}); "
                             f"expected {{\"name\": ..., \"arguments\": {{...}}}}") from None
    out = [call.get("function", call) if isinstance(call, dict) else call
           for call in (calls if isinstance(calls, list) else [calls])]
    if not out or not all(isinstance(call, dict) and isinstance(call.get("name"), str)
                          and "arguments" in call for call in out):
        raise InputError(f"{where}: tool call {calls!r:.80}: expected {{name: text, "
                         f"arguments: ...}} (or a list of them, or OpenAI's "
                         f"{{type: function, function: {{name, arguments}}}})")
    return [{"type": "function", "function": {"name": call["name"],
                                              "arguments": call["arguments"]}} for call in out]


def clean(record: dict, fmt: str) -> dict:
    """Keep only the fields the format and evaluation use, with optional text fields filled."""
    out = {k: record[k] for k in REQUIRED[fmt] + OPTIONAL[fmt] + PASSTHROUGH if k in record}
    if fmt == "alpaca":
        out["input"] = out.get("input") or ""
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
    return _render(history[:last], tokenizer, True, record.get("tools"))


def answer_text(record: dict, fmt: str) -> str:
    if fmt == "chat":
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    return record[REQUIRED[fmt][-1]]  # the format's last required field: output, completion


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def segments(record: dict, fmt: str, tokenizer) -> list[tuple[list[int], bool]]:
    """Token-id segments of one record, each flagged True when it carries loss."""
    if fmt == "chat":
        return _chat_segments(record["messages"], tokenizer, record.get("tools"))
    prompt = prompt_text(record, fmt, tokenizer)
    answer = _ids(tokenizer, answer_text(record, fmt), special=False)
    return [(_ids(tokenizer, prompt, special=True), False),
            (answer + [tokenizer.eos_token_id], True)]


def _render(messages: list[dict], tokenizer, generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except SecurityError as err:  # transformers renders in jinja2's sandbox
        raise InputError(f"the tokenizer's chat template reaches for Python objects ({err}); "
                         f"expected a template that renders messages only") from None
    except TemplateError as err:  # the template's raise_exception (a role it does not take)
        roles = [m["role"] for m in messages]
        raise InputError(f"the tokenizer's chat template refused roles {roles}: {err}; "
                         f"expected a base whose chat template renders them") from None


def _check_tools_rendered(messages: list[dict], tokenizer, tools: list[dict] | None) -> None:
    """Refuse function definitions, a tool call or a result that the template leaves out (many
    render only system, user and assistant text): the definitions must change the rendered
    conversation, and what a message adds to it must hold the result's text, or the name of
    each function called."""
    if tools and _render(messages, tokenizer, tools=tools) == _render(messages, tokenizer):
        raise InputError("column 'tools': the tokenizer's chat template leaves the function "
                         "definitions out; expected a base whose chat template renders tools")
    for i, message in enumerate(messages):
        wanted = [call["function"]["name"] for call in message.get("tool_calls", ())]
        wanted += [message["content"]] if message["role"] == "tool" else []
        before = _render(messages[:i], tokenizer, tools=tools) if i else ""
        added = _render(messages[: i + 1], tokenizer, tools=tools).removeprefix(before)
        missing = [text for text in wanted if text not in added]
        if missing:
            kind = "tool call" if message["role"] == "assistant" else "tool result"
            raise InputError(f"messages[{i}] (role '{message['role']}', a {kind}): the "
                             f"tokenizer's chat template leaves out {missing[0]!r:.60}; expected "
                             f"a base whose chat template renders tool calls and results, or "
                             f"conversations without them")


def _chat_segments(messages: list[dict], tokenizer,
                   tools: list[dict] | None) -> list[tuple[list[int], bool]]:
    """Every assistant turn (tool calls included) carries loss; everything else (system, user,
    tool results, headers) does not.

    The template is rendered for growing prefixes of the conversation; each assistant turn's
    tokens are the difference between the render that ends before it and the one that ends
    after it. This needs the template's renders to be token-prefixes of each other, which we
    check instead of assuming.
    """
    def render(upto: int, generation_prompt: bool) -> list[int]:
        return _ids(tokenizer, _render(messages[:upto], tokenizer, generation_prompt, tools),
                    special=False)

    if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        _check_tools_rendered(messages, tokenizer, tools)
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
