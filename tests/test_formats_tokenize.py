"""qlora_pipeline.data.formats/tokenize and the tokenize stage, with the tiny ChatML tokenizer:
which tokens carry loss, truncation, packing and the statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CHAT_TEMPLATE, stage
from qlora_pipeline.data import formats
from qlora_pipeline.data.tokenize import IGNORE, pack, tokenize_record, tokenize_split
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.data.sources import read_split


def fetch_dataset(dataset: dict, fmt: str, out) -> None:
    stage("fetch_dataset")(raw=out, dataset=dataset, format=fmt)


def tokenize_dataset(raw, base, fmt: str, cfg: dict, out) -> None:
    stage("tokenize")(raw=raw, base=base, tokenized=out, format=fmt, tokenize=cfg)

CFG = {"max_length": 256, "train_on_prompt": False, "packing": False}
CHAT = {"messages": [{"role": "user", "content": "What is 12 + 34?"},
                     {"role": "assistant", "content": "46"}]}
MULTI_TURN = {"messages": [
    {"role": "system", "content": "Answer with the number only."},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "And 46 - 12?"},
    {"role": "assistant", "content": "34"},
]}
ALPACA = {"instruction": "What is 12 + 34?", "input": "", "output": "46"}
ALPACA_INPUT = {"instruction": "Classify the topic.", "input": "The storm hit the valley.",
                "output": "weather"}
COMPLETION = {"prompt": "What is 12 + 34?\n", "completion": "46"}


def loss_spans(example: dict) -> list[list[int]]:
    """Runs of consecutive positions whose label is not IGNORE."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # a labelled token is labelled with itself
            current.append(token)
    return spans + ([current] if current else [])


def masked_text(example: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"])
                             if label == IGNORE])


class CharTokenizer:
    """One token per character (id = code point) and eos 0: lengths are known by hand."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def completion(prompt_len: int, answer_len: int) -> dict:
    return {"prompt": "p" * prompt_len, "completion": "a" * answer_len}


# ---- which tokens carry loss -------------------------------------------------------------------

@pytest.mark.parametrize("record, fmt", [(ALPACA, "alpaca"), (ALPACA_INPUT, "alpaca"),
                                         (COMPLETION, "completion")])
def test_prompt_is_masked_and_answer_plus_eos_is_labelled(tiny_tokenizer, record, fmt):
    example, truncated, _ = tokenize_record(record, fmt, tiny_tokenizer, 256, False)
    assert not truncated
    prompt = formats.prompt_text(record, fmt, tiny_tokenizer)
    answer = formats.answer_text(record, fmt)
    n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert tiny_tokenizer.decode(example["input_ids"][:n_prompt]) == prompt
    spans = loss_spans(example)
    assert len(spans) == 1 and len(spans[0]) == len(example["input_ids"]) - n_prompt
    assert tiny_tokenizer.decode(spans[0]) == answer + "<|im_end|>"
    assert example["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_alpaca_prompt_is_the_stanford_template(tiny_tokenizer):
    assert formats.prompt_text(ALPACA_INPUT, "alpaca", tiny_tokenizer) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClassify the topic.\n\n### Input:\nThe storm hit the valley.\n\n"
        "### Response:\n")
    without = formats.prompt_text(ALPACA, "alpaca", tiny_tokenizer)
    assert "### Input:" not in without and without.endswith("### Response:\n")


def test_chat_labels_the_assistant_turn_and_its_end_marker(tiny_tokenizer):
    example, *_ = tokenize_record(CHAT, "chat", tiny_tokenizer, 256, False)
    rendered = tiny_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tiny_tokenizer.decode(example["input_ids"]) == rendered
    assert [tiny_tokenizer.decode(s) for s in loss_spans(example)] == ["46<|im_end|>\n"]
    assert masked_text(example, tiny_tokenizer) == (
        "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n")


def test_multi_turn_chat_every_assistant_turn_carries_loss(tiny_tokenizer):
    example, *_ = tokenize_record(MULTI_TURN, "chat", tiny_tokenizer, 256, False)
    assert [tiny_tokenizer.decode(s) for s in loss_spans(example)] == [
        "46<|im_end|>\n", "34<|im_end|>\n"]
    masked = masked_text(example, tiny_tokenizer)
    for message in MULTI_TURN["messages"]:
        if message["role"] != "assistant":
            assert f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n" in masked
    assert masked.count("<|im_start|>assistant\n") == 2  # the headers are prompt, not answer


def test_chat_turns_after_the_last_answer_are_masked(tiny_tokenizer):
    record = {"messages": CHAT["messages"] + [{"role": "user", "content": "Thanks"}]}
    example, *_ = tokenize_record(record, "chat", tiny_tokenizer, 256, False)
    assert [tiny_tokenizer.decode(s) for s in loss_spans(example)] == ["46<|im_end|>\n"]
    assert masked_text(example, tiny_tokenizer).endswith("<|im_start|>user\nThanks<|im_end|>\n")


def test_chat_template_with_a_default_system_prompt(tiny_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (  # SmolLM2's: a system turn is added when there is none
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    example, *_ = tokenize_record(MULTI_TURN | {"messages": MULTI_TURN["messages"][1:]}, "chat",
                                 tokenizer, 256, False)
    assert [tokenizer.decode(s) for s in loss_spans(example)] == ["46<|im_end|>\n",
                                                                  "34<|im_end|>\n"]
    assert masked_text(example, tokenizer).startswith("<|im_start|>system\nYou are helpful.")


def test_template_that_is_not_prefix_consistent_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{{ messages | length }}\n" + CHAT_TEMPLATE
    with pytest.raises(InputError, match="prefix-consistently"):
        tokenize_record(MULTI_TURN, "chat", tokenizer, 256, False)


@pytest.mark.parametrize("record, fmt", [(ALPACA_INPUT, "alpaca"), (COMPLETION, "completion"),
                                         (MULTI_TURN, "chat")])
def test_train_on_prompt_labels_everything(tiny_tokenizer, record, fmt):
    masked, *_ = tokenize_record(record, fmt, tiny_tokenizer, 256, False)
    full, *_ = tokenize_record(record, fmt, tiny_tokenizer, 256, True)
    assert full["input_ids"] == masked["input_ids"]
    assert full["labels"] == full["input_ids"]
    assert IGNORE in masked["labels"]


# ---- truncation, dropping, packing -------------------------------------------------------------

def test_truncation_keeps_max_length_tokens(tiny_tokenizer):
    whole, truncated, _ = tokenize_record(MULTI_TURN, "chat", tiny_tokenizer, 256, False)
    assert not truncated
    n = len(whole["input_ids"])
    cut, truncated, _ = tokenize_record(MULTI_TURN, "chat", tiny_tokenizer, n - 3, False)
    assert truncated
    assert cut == {"input_ids": whole["input_ids"][:n - 3], "labels": whole["labels"][:n - 3]}
    exact, truncated, _ = tokenize_record(MULTI_TURN, "chat", tiny_tokenizer, n, False)
    assert not truncated and exact == whole


def test_stats_on_a_handmade_set():
    records = [completion(2, 1),    # 2 + 1 + eos = 4 tokens, 2 carry loss
               completion(4, 3),    # 8 tokens, 4 carry loss
               completion(8, 2),    # 11 tokens, cut to 10: the answer keeps 2 of 3
               completion(12, 1)]   # 14 tokens, cut to 10: no answer left, dropped
    examples, stats = tokenize_split(records, "completion", CharTokenizer(),
                                     {"max_length": 10, "train_on_prompt": False,
                                      "packing": False})
    assert [len(e["input_ids"]) for e in examples] == [4, 8, 10]
    assert stats == {"examples": 3, "truncated": 2, "truncated_pct": 50.0,
                     "dropped_no_answer_left": 1,
                     "length_percentiles": {"p50": 8, "p90": 10, "p99": 10, "max": 10},
                     "tokens": 22, "loss_tokens_pct": round(100 * 8 / 22, 2)}
    assert examples[2]["labels"] == [IGNORE] * 8 + [ord("a")] * 2
    assert all(e["attention_mask"] == [1] * len(e["input_ids"]) for e in examples)


def test_length_percentiles_are_observed_lengths():
    records = [completion(n, 1) for n in range(1, 101)]  # lengths 3..102
    _, stats = tokenize_split(records, "completion", CharTokenizer(), CFG)
    lengths = np.arange(3, 103)
    for q in (50, 90, 99):
        p = stats["length_percentiles"][f"p{q}"]
        assert p in lengths and np.mean(lengths <= p) >= q / 100
        assert np.mean(lengths <= p - 1) < q / 100  # and the smallest such length
    assert stats["length_percentiles"]["max"] == 102 and stats["tokens"] == int(lengths.sum())


def test_dropped_examples_with_the_tiny_tokenizer(tiny_tokenizer):
    prompt_only = len(tiny_tokenizer.apply_chat_template(
        CHAT["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True,
    )["input_ids"])
    records = [CHAT, {"messages": [{"role": "user", "content": "What is 12 + 34? " * 5},
                                   {"role": "assistant", "content": "46"}]}]
    examples, stats = tokenize_split(records, "chat", tiny_tokenizer,
                                     CFG | {"max_length": prompt_only + 1})
    assert stats["examples"] == 1 and stats["dropped_no_answer_left"] == 1
    assert stats["truncated"] == 2 and stats["truncated_pct"] == 100.0
    # One token past the prompt: the answer's first token ("46" is one token here).
    assert loss_spans(examples[0]) == [tiny_tokenizer("46")["input_ids"][:1]]


def test_train_on_prompt_still_drops_examples_without_answer():
    records = [completion(3, 2), completion(20, 2)]
    examples, stats = tokenize_split(records, "completion", CharTokenizer(),
                                     {"max_length": 10, "train_on_prompt": True,
                                      "packing": False})
    assert len(examples) == 1 and stats["dropped_no_answer_left"] == 1
    assert stats["loss_tokens_pct"] == 100.0 and examples[0]["labels"] == \
        examples[0]["input_ids"]


def test_pack_concatenates_whole_examples_greedily():
    examples = [{"input_ids": [i] * n, "labels": [IGNORE] * (n - 1) + [i]}
                for i, n in enumerate([3, 4, 2, 6, 1, 5, 5], start=1)]
    packed = pack(examples, max_length=8)
    # In order: 3+4 (+2 > 8) | 2+6 (+1 > 8) | 1+5 (+5 > 8) | 5
    assert [p["input_ids"] for p in packed] == [
        [1] * 3 + [2] * 4, [3] * 2 + [4] * 6, [5] + [6] * 5, [7] * 5]
    assert packed[0]["labels"] == [IGNORE, IGNORE, 1, IGNORE, IGNORE, IGNORE, 2]
    assert pack([], 8) == []


def test_pack_never_exceeds_max_length_nor_splits_an_example(tiny_tokenizer):
    records = [{"prompt": f"What is {a} + {b}?\n", "completion": str(a + b)}
               for a in range(10, 40, 3) for b in (11, 57)]
    cfg = {"max_length": 40, "train_on_prompt": False, "packing": True}
    packed, stats = tokenize_split(records, "completion", tiny_tokenizer, cfg)
    singles, _ = tokenize_split(records, "completion", tiny_tokenizer, cfg | {"packing": False})
    assert stats["packed_sequences"] == len(packed) < len(singles)
    assert stats["examples"] == len(singles) == len(records)
    assert all(len(p["input_ids"]) <= 40 for p in packed)
    assert all(len(p["attention_mask"]) == len(p["input_ids"]) == len(p["labels"])
               == len(p["position_ids"]) for p in packed)
    # Positions restart at every example (training/packing.py isolates them by these).
    assert sum((p["position_ids"] for p in packed), []) == sum(
        (list(range(len(s["input_ids"]))) for s in singles), [])
    unpacked, _ = tokenize_split(records, "completion", tiny_tokenizer, cfg, packable=False)
    assert unpacked == singles
    # The concatenation is unchanged and every sequence boundary is an example boundary.
    for field in ("input_ids", "labels"):
        assert sum((p[field] for p in packed), []) == sum((s[field] for s in singles), [])
    ends = np.cumsum([len(s["input_ids"]) for s in singles]).tolist()
    assert set(np.cumsum([len(p["input_ids"]) for p in packed]).tolist()) <= set(ends)
    # Greedy: the next example would not have fitted into the sequence before it.
    for i in range(len(packed) - 1):
        start = sum(len(p["input_ids"]) for p in packed[: i + 1])
        nxt = singles[ends.index(start) + 1]
        assert len(packed[i]["input_ids"]) + len(nxt["input_ids"]) > 40


# ---- the tokenize stage ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "raw"
    fetch_dataset({"source": "builtin", "name": "arithmetic", "num_examples": 40, "seed": 1,
                   "validation_fraction": 0.1, "test_fraction": 0.1}, "chat", out)
    return out


def test_tokenize_dataset_writes_a_loadable_dataset(raw_dir, tiny_model_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "tokenized"
    tokenize_dataset(raw_dir, tiny_model_dir, "chat", CFG, out)
    data = load_from_disk(str(out))
    assert set(data) == {"train", "validation", "test"}
    assert [len(data[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    assert set(data["train"].column_names) == {"input_ids", "labels", "attention_mask"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for record, example in zip(read_split(raw_dir, "validation"), data["validation"]):
        answer = record["messages"][-1]["content"]
        assert [tokenizer.decode(s) for s in loss_spans(example)] == [answer + "<|im_end|>\n"]
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["format"] == "chat" and stats["max_length"] == 256
    assert stats["splits"]["train"]["examples"] == 32
    assert stats["splits"]["test"]["truncated"] == 0
    assert stats["splits"]["train"]["tokens"] == sum(len(x) for x in data["train"]["input_ids"])
    provenance = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["stage"] == "tokenize"
    assert provenance["params"] == {"format": "chat", "tokenize": CFG}
    assert set(provenance["inputs"]) == {"raw", "base"}  # the rule's names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenized"]


def test_tokenize_dataset_with_packing(raw_dir, tiny_model_dir, tmp_path):
    from datasets import load_from_disk

    cfg = CFG | {"max_length": 64, "packing": True}
    tokenize_dataset(raw_dir, tiny_model_dir, "chat", cfg, tmp_path / "packed")
    data = load_from_disk(str(tmp_path / "packed"))
    stats = json.loads((tmp_path / "packed/stats.json").read_text(encoding="utf-8"))
    assert len(data["train"]) == stats["splits"]["train"]["packed_sequences"] < 32
    assert max(len(x) for x in data["train"]["input_ids"]) <= 64


def test_chat_needs_a_tokenizer_with_a_chat_template(raw_dir, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    plain = tmp_path / "plain-tokenizer"
    tokenizer.save_pretrained(plain)
    assert not AutoTokenizer.from_pretrained(plain).chat_template
    out = tmp_path / "out" / "tokenized"
    with pytest.raises(InputError) as info:
        tokenize_dataset(raw_dir, plain, "chat", CFG, out)
    message = str(info.value)
    assert "format 'chat'" in message and str(plain) in message and "expected" in message
    assert not out.exists() and not (tmp_path / "out").exists()


def test_max_length_that_cuts_every_answer(raw_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "tokenized"
    with pytest.raises(InputError, match=r"train\.jsonl: no example left.*max_length 8"):
        tokenize_dataset(raw_dir, tiny_model_dir, "chat", CFG | {"max_length": 8}, out)
    assert list(tmp_path.iterdir()) == []


# ---- ShareGPT and tool calls -------------------------------------------------------------------

# ChatML with each tool call written in tags after the content, as Qwen2.5's template does,
# and the function definitions (`tools`) in a system turn of their own. CHAT_TEMPLATE
# (SmolLM2's) writes only each message's content: it drops a call and the definitions.
CALLS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content }}"
    "{% for call in message.tool_calls or [] %}{{ '<tool_call>' + call.function.name + ' ' + "
    "call.function.arguments | tojson + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOL_TEMPLATE = ("{% if tools %}{{ '<|im_start|>system\n' + tools | tojson + '<|im_end|>\n' }}"
                 "{% endif %}" + CALLS_TEMPLATE)
TOOLS = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
SHAREGPT = [{"from": "system", "value": "Answer with the number only."},  # MULTI_TURN
            {"from": "human", "value": "What is 12 + 34?"}, {"from": "gpt", "value": "46"},
            {"from": "human", "value": "And 46 - 12?"}, {"from": "gpt", "value": "34"}]


def tool_conversation(city: str, weather: str) -> list[dict]:
    """A ShareGPT conversation with a call and its result, in LLaMA-Factory's names."""
    call = {"name": "get_weather", "arguments": {"city": city}}
    return [{"from": "human", "value": f"Weather in {city}?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": weather}, {"from": "gpt", "value": f"{weather}."}]


def read_chat(conversation: list[dict]) -> dict:
    """The record fetch_dataset stores for a conversation (dataset.columns maps the column)."""
    return formats.clean(formats.check_record({"messages": conversation}, "chat", "t"), "chat")


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def test_sharegpt_is_read_as_chat_and_its_gpt_turns_carry_loss(tiny_tokenizer):
    record = read_chat(SHAREGPT)
    assert record == MULTI_TURN
    example, *_ = tokenize_record(record, "chat", tiny_tokenizer, 256, False)
    assert [tiny_tokenizer.decode(s) for s in loss_spans(example)] == [
        "46<|im_end|>\n", "34<|im_end|>\n"]


def test_tool_calls_carry_loss_and_tool_results_do_not(tool_tokenizer):
    record = read_chat(tool_conversation("Oslo", "rain, 4 C"))
    assert record["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert record["messages"][2] == {"role": "tool", "content": "rain, 4 C"}
    openai = [{"role": "user", "content": "Weather in Oslo?"},  # the same in OpenAI's spelling
              {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
               "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
              {"role": "tool", "content": "rain, 4 C"},
              {"role": "assistant", "content": "rain, 4 C."}]
    assert read_chat(openai) == record
    # The function definitions, as LLaMA-Factory writes them (JSON text), go to the template.
    defined = formats.clean(formats.check_record({"messages": openai, "tools": json.dumps(TOOLS)},
                                                 "chat", "t"), "chat")
    assert defined == record | {"tools": TOOLS}
    for tools in ("", json.dumps(TOOLS)):
        example, *_ = tokenize_record(defined if tools else record, "chat", tool_tokenizer, 256,
                                      False)
        assert [tool_tokenizer.decode(s) for s in loss_spans(example)] == [
            '<tool_call>get_weather {"city": "Oslo"}</tool_call><|im_end|>\n',
            "rain, 4 C.<|im_end|>\n"]
        assert masked_text(example, tool_tokenizer) == (
            (f"<|im_start|>system\n{tools}<|im_end|>\n" if tools else "")
            + "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
            "<|im_start|>tool\nrain, 4 C<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template, refused", [
    (CHAT_TEMPLATE, "messages[1] (role 'assistant', a tool call): the tokenizer's chat "
                    "template leaves out 'get_weather'"),
    (TOOL_TEMPLATE.replace("{{ '<|im_start|>'", "{% if message.role != 'tool' %}"
                           "{{ '<|im_start|>'").replace("{{ '<|im_end|>\n' }}",
                                                        "{{ '<|im_end|>\n' }}{% endif %}"),
     "messages[2] (role 'tool', a tool result): the tokenizer's chat template leaves out "
     "'rain'"),
    ("{% for message in messages %}{% if message.role == 'tool' %}"
     "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
     "{% endfor %}" + TOOL_TEMPLATE,
     "the tokenizer's chat template refused roles ['user', 'assistant', 'tool']: Only user"),
])
def test_template_without_tool_messages_is_refused(tool_tokenizer, template, refused):
    from copy import deepcopy

    tokenizer = deepcopy(tool_tokenizer)
    tokenizer.chat_template = template
    records = [read_chat(SHAREGPT), read_chat(tool_conversation("Oslo", "rain"))]
    with pytest.raises(InputError) as info:
        tokenize_split(records, "chat", tokenizer, CFG, where="raw/train.jsonl")
    assert str(info.value).startswith(f"raw/train.jsonl: line 2: {refused}")
    assert "expected" in str(info.value) and "\n" not in str(info.value)


def test_template_without_function_definitions_is_refused(tool_tokenizer):
    from copy import deepcopy

    tokenizer = deepcopy(tool_tokenizer)
    tokenizer.chat_template = CALLS_TEMPLATE
    record = read_chat(tool_conversation("Oslo", "rain")) | {"tools": TOOLS}
    tokenize_split([record | {"tools": []}], "chat", tokenizer, CFG)  # no definitions: kept
    with pytest.raises(InputError, match=r"^raw/train\.jsonl: line 1: column 'tools': the "
                                         r"tokenizer's chat template leaves the function "
                                         r"definitions out; expected"):
        tokenize_split([record], "chat", tokenizer, CFG, where="raw/train.jsonl")


def test_sharegpt_and_tool_calls_through_the_tiny_pipeline(tmp_path, tiny_model_dir,
                                                           tool_tokenizer, run_snakemake):
    """A ShareGPT file and a file of tool-call conversations, a task each, fetched and
    tokenized by snakemake on a base whose template renders tools: every example's loss."""
    import shutil

    from datasets import load_from_disk

    from conftest import tiny_config, write_yaml

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    tool_tokenizer.save_pretrained(base)
    chats = [{"conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                {"from": "gpt", "value": str(i + 1)}]} for i in range(10)]
    (tmp_path / "chats.json").write_text(json.dumps(chats), encoding="utf-8")
    tools = [{"conversations": tool_conversation(f"City {i}", f"{i} C"),
              "tools": json.dumps(TOOLS)} for i in range(10)]
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tools),
                                          encoding="utf-8")
    write_yaml(tmp_path / "config/config.yaml", tiny_config(base, tasks=("chats", "tools")))
    for task, path in (("chats", "chats.json"), ("tools", "tools.jsonl")):
        write_yaml(tmp_path / f"config/tasks/{task}.yaml", {"format": "chat", "dataset": {
            "source": "local", "path": path, "columns": {"messages": "conversations"}},
            "tokenize": {"max_length": 256}})
    run_snakemake(tmp_path, *(f"results/data/{task}/tokenized" for task in ("chats", "tools")))

    def loss(messages: list[dict]) -> list[str]:  # what TOOL_TEMPLATE writes for each answer
        return [m["content"] + "".join(f"<tool_call>{c['function']['name']} "
                                       f"{json.dumps(c['function']['arguments'])}</tool_call>"
                                       for c in m.get("tool_calls", [])) + "<|im_end|>\n"
                for m in messages if m["role"] == "assistant"]

    for task, answers in (("chats", 1), ("tools", 2)):
        data = load_from_disk(str(tmp_path / f"results/data/{task}/tokenized"))
        records = [r for split in data for r in read_split(tmp_path / f"results/data/{task}/raw",
                                                           split)]
        examples = [e for split in data for e in data[split]]
        assert len(examples) == len(records) == 10
        for record, example in zip(records, examples):
            spans = [tool_tokenizer.decode(s) for s in loss_spans(example)]
            assert spans == loss(record["messages"]) and len(spans) == answers
            assert record.get("tools") == (TOOLS if task == "tools" else None)
            assert masked_text(example, tool_tokenizer).startswith(
                f"<|im_start|>system\n{json.dumps(TOOLS)}<|im_end|>\n" if task == "tools"
                else "<|im_start|>user\n")
            for message in record["messages"]:
                if message["role"] in ("user", "tool"):
                    assert (f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
                            in masked_text(example, tool_tokenizer))
