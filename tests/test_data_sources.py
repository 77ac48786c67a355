"""qlora_pipeline.data.builtin/sources and the fetch_dataset stage: every source, the splits,
and the messages for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_pipeline.data import builtin, sources
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.data.sources import read_split


def fetch_dataset(dataset: dict, fmt: str, out, files=()) -> None:
    from conftest import stage

    stage("fetch_dataset")(raw=out, dataset=dataset, format=fmt, files=files)

# ---- helpers -----------------------------------------------------------------------------------


def completion_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Q{i}?\n", "completion": f"A{i}"} for i in range(start, start + n)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_frame(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def local(path=None, files=None, **extra) -> dict:
    """A dataset config as the task schema leaves it (defaults filled)."""
    cfg = {"source": "local", "seed": 0, "columns": {}, "validation_fraction": 0.1,
           "test_fraction": 0.1, **extra}
    if path is not None:
        cfg["path"] = str(path)
    if files is not None:
        cfg["files"] = {split: str(p) for split, p in files.items()}
    return cfg


def all_records(splits: dict) -> list[dict]:
    return [r for split in sources.SPLITS for r in splits[split]]


def key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def input_error(call, *args) -> str:
    with pytest.raises(InputError) as info:
        call(*args)
    return str(info.value)


# ---- builtin generators ------------------------------------------------------------------------

def test_list_sum_answers_and_lengths_spread():
    """The packing benchmark's data: right sums, and list lengths from 1 to ~100 (most short)."""
    import re

    records = builtin.generate("list_sum", 400, seed=0)
    counts = []
    for record in records:
        numbers = [int(n) for n in re.findall(r"\d+", record["prompt"])]
        assert record["completion"] == str(sum(numbers))
        counts.append(len(numbers))
    assert min(counts) == 1 and max(counts) >= 80
    assert sorted(counts)[len(counts) // 2] <= 20  # log-uniform: most lists are short


@pytest.mark.parametrize("name", sorted(builtin.GENERATORS))
def test_builtin_is_deterministic_for_a_seed(name):
    first = builtin.generate(name, 50, seed=4)
    assert len(first) == 50
    assert first == builtin.generate(name, 50, seed=4)
    assert first != builtin.generate(name, 50, seed=5)
    assert builtin.generate(name, 20, seed=4) == first[:20]  # more examples extend, not reshuffle


def test_arithmetic_answers_are_correct():
    records = builtin.arithmetic(300, seed=0)
    ops = set()
    for record in records:
        match = re.fullmatch(r"What is (\d\d) ([+-]) (\d\d)\? Answer with the number only\.",
                             record["prompt"])
        assert match, record["prompt"]
        a, op, b = int(match[1]), match[2], int(match[3])
        ops.add(op)
        assert record["completion"] == str(a + b if op == "+" else a - b)
        assert 10 <= a <= 99 and 10 <= b <= 99
    assert ops == {"+", "-"}
    assert len({r["prompt"] for r in records}) == len(records)  # no repeated question


def test_arithmetic_options_set_the_range_and_operations():
    records = builtin.arithmetic(30, seed=0, min_operand=0, max_operand=5, operations="+")
    for record in records:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? .*", record["prompt"]).groups())
        assert 0 <= a <= 5 and 0 <= b <= 5 and record["completion"] == str(a + b)
    # every distinct problem can be drawn, each once
    assert len({r["prompt"] for r in builtin.arithmetic(36, 0, 0, 5, "+")}) == 36
    message = input_error(builtin.arithmetic, 37, 0, 0, 5, "+")
    assert "found 37, but operands 0..5 with '+' make only 36 distinct problems" in message


def test_system_prompt_goes_first_unless_a_record_has_its_own():
    cfg = {"source": "builtin", "name": "topic", "num_examples": 20, "seed": 2,
           "validation_fraction": 0.1, "test_fraction": 0.1, "system_prompt": "Classify."}
    for record in all_records(sources.fetch(cfg, "chat")):
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        assert record["messages"][0]["content"] == "Classify."
    own = {"messages": [{"role": "system", "content": "Mine."},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert sources.with_system_prompt(own, "Classify.") == own


def test_topic_labels_match_choices_and_sentence():
    records = builtin.topic(200, seed=0)
    assert {r["completion"] for r in records} == set(builtin.TOPICS)
    for record in records:
        assert record["choices"] == list(builtin.TOPICS)
        assert record["choices"][record["label"]] == record["completion"]
        sentence = re.search(r"Sentence: (.*)\n", record["prompt"])[1]
        subjects, verbs, objects = builtin.TOPICS[record["completion"]]
        assert any(sentence.startswith(s + " ") for s in subjects), sentence
        assert any(sentence.endswith(" " + o + ".") for o in objects), sentence


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "completion"])
def test_builtin_fetch_in_every_format(fmt):
    cfg = {"source": "builtin", "name": "topic", "num_examples": 40, "seed": 2,
           "validation_fraction": 0.1, "test_fraction": 0.2}
    splits = sources.fetch(cfg, fmt)
    assert [len(splits[s]) for s in sources.SPLITS] == [28, 4, 8]
    record = splits["train"][0]
    assert record["choices"] == list(builtin.TOPICS) and isinstance(record["label"], int)
    answer = {"chat": lambda r: r["messages"][-1]["content"], "alpaca": lambda r: r["output"],
              "completion": lambda r: r["completion"]}[fmt](record)
    assert answer == record["choices"][record["label"]]
    if fmt == "chat":
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert sources.fetch(cfg, fmt) == splits


# ---- local files -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".json-data", ".csv", ".parquet"])
def test_every_local_file_type_loads(tmp_path, suffix):
    rows = completion_rows(30)
    if suffix == ".jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif suffix == ".json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".json-data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": rows, "version": 1}), encoding="utf-8")
    else:
        path = write_frame(tmp_path / f"d{suffix}", rows)
    splits = sources.fetch(local(path), "completion")
    assert [len(splits[s]) for s in sources.SPLITS] == [24, 3, 3]
    assert sorted(map(key, all_records(splits))) == sorted(map(key, rows))


def test_csv_values_stay_text(tmp_path):
    # A column of numbers (arithmetic answers) must not become ints, nor "007" lose its zeros.
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n" + "".join(f"What is {i}+1?,{i + 1}\n"
                                                     for i in range(9))
                    + "Bond?,007\n", encoding="utf-8")
    records = all_records(sources.fetch(local(path), "completion"))
    assert {r["completion"] for r in records} == {str(i) for i in range(1, 10)} | {"007"}


def test_csv_quoted_fields_and_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    body = "instruction,input,output\n" + "".join(
        f'"Line one\nline two, {i}",,"say ""{i}"""\n' for i in range(10))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = all_records(sources.fetch(local(path), "alpaca"))
    assert len(records) == 10
    assert {r["output"] for r in records} == {f'say "{i}"' for i in range(10)}
    assert all(r["instruction"].startswith("Line one\nline two, ") for r in records)
    assert all(r["input"] == "" for r in records)


def test_parquet_nested_messages_and_nulls(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": f"hello {i}"}]} for i in range(10)]
    splits = sources.fetch(local(write_frame(tmp_path / "c.parquet", chats)), "chat")
    assert sorted(map(key, all_records(splits))) == sorted(map(key, chats))
    alpaca = [{"instruction": f"do {i}", "input": None if i % 2 else f"x{i}", "output": f"{i}"}
              for i in range(10)]
    records = all_records(sources.fetch(local(write_frame(tmp_path / "a.parquet", alpaca)),
                                        "alpaca"))
    assert sorted(r["input"] for r in records) == [""] * 5 + [f"x{i}" for i in range(0, 10, 2)]


def test_jsonl_text_with_unicode_line_separators(tmp_path):
    rows = [{"prompt": f"a\u2028b\u0085c {i}\r", "completion": "\u00e9t\u00e9"} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                    encoding="utf-8")
    assert sorted(map(key, all_records(sources.fetch(local(path), "completion")))) \
        == sorted(map(key, rows))


def test_suffix_is_case_insensitive_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "D.JSONL"
    path.write_text("\n".join(json.dumps(r) + "\n" for r in completion_rows(10)), "utf-8")
    assert len(all_records(sources.fetch(local(path), "completion"))) == 10


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(20)]
    cfg = local(write_jsonl(tmp_path / "d.jsonl", rows),
                columns={"prompt": "question", "completion": "answer"})
    records = all_records(sources.fetch(cfg, "completion"))
    assert sorted(map(key, records)) == sorted(
        key({"prompt": r["question"], "completion": r["answer"]}) for r in rows)
    bad = local(cfg["path"], columns={"prompt": "query", "completion": "answer"})
    message = input_error(sources.fetch, bad, "completion")
    assert f"{cfg['path']}: line 1" in message and "'query'" in message
    assert "answer, extra, question" in message.replace("'", "")


def test_given_splits_are_used_as_they_are(tmp_path):
    train = completion_rows(20)
    validation, test = completion_rows(3, start=100), completion_rows(4, start=200)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train),
             "validation": write_jsonl(tmp_path / "val.jsonl", validation),
             "test": write_jsonl(tmp_path / "test.jsonl", test)}
    splits = sources.fetch(local(files=files), "completion")
    assert splits["validation"] == validation and splits["test"] == test  # same order too
    assert sorted(map(key, splits["train"])) == sorted(map(key, train))


def test_missing_test_split_is_carved_from_train(tmp_path):
    train, validation = completion_rows(40), completion_rows(5, start=100)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train),
             "validation": write_jsonl(tmp_path / "val.jsonl", validation)}
    splits = sources.fetch(local(files=files, test_fraction=0.25), "completion")
    assert splits["validation"] == validation
    assert (len(splits["train"]), len(splits["test"])) == (30, 10)
    assert sorted(map(key, splits["train"] + splits["test"])) == sorted(map(key, train))


def test_carving_is_seeded_disjoint_and_sized(tmp_path):
    rows = completion_rows(100)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = local(path, seed=7, validation_fraction=0.15, test_fraction=0.05)
    splits = sources.fetch(cfg, "completion")
    sizes = [len(splits[s]) for s in sources.SPLITS]
    assert sizes == [80, 15, 5]
    keys = [set(map(key, splits[s])) for s in sources.SPLITS]
    assert sum(map(len, keys)) == 100 and set.union(*keys) == set(map(key, rows))
    assert sources.fetch(cfg, "completion") == splits
    other = sources.fetch({**cfg, "seed": 8}, "completion")
    assert set(map(key, other["validation"])) != keys[1]


def test_tiny_dataset_keeps_one_example_per_carved_split(tmp_path):
    splits = sources.fetch(local(write_jsonl(tmp_path / "d.jsonl", completion_rows(3))),
                           "completion")
    assert [len(splits[s]) for s in sources.SPLITS] == [1, 1, 1]
    message = input_error(sources.fetch, local(write_jsonl(tmp_path / "e.jsonl",
                                                           completion_rows(2))), "completion")
    assert "only 2 training examples" in message


def test_max_examples_caps_every_split(tmp_path):
    cfg = local(write_jsonl(tmp_path / "d.jsonl", completion_rows(100)), max_examples=6)
    splits = sources.fetch(cfg, "completion")
    assert [len(splits[s]) for s in sources.SPLITS] == [6, 6, 6]
    full = sources.fetch({**cfg, "max_examples": None}, "completion")
    for split in sources.SPLITS:
        assert splits[split] == full[split][:6]  # carved first, then capped


# ---- hub layout (a local folder, no network) ---------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Keep datasets' cache for these folders out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_hub_parquet_layout_with_validation(tmp_path, hub_cache):
    repo = tmp_path / "hub-repo"
    train = completion_rows(30)
    validation = completion_rows(4, start=100)
    write_frame(repo / "data/train-00000-of-00001.parquet", train)
    write_frame(repo / "data/validation-00000-of-00001.parquet", validation)
    (repo / "README.md").write_text("# a test dataset\n", encoding="utf-8")
    cfg = {"source": "hub", "name": str(repo), "revision": "main", "seed": 0,
           "splits": {"train": "train", "validation": "validation"},
           "validation_fraction": 0.1, "test_fraction": 0.2}
    splits = sources.fetch(cfg, "completion")
    assert splits["validation"] == validation
    assert (len(splits["train"]), len(splits["test"])) == (24, 6)
    assert sorted(map(key, splits["train"] + splits["test"])) == sorted(map(key, train))


def test_hub_jsonl_layout_with_split_and_column_mapping(tmp_path, hub_cache):
    repo = tmp_path / "hub-json"
    rows = [{"q": f"q{i}", "a": str(i)} for i in range(20)]
    write_jsonl(repo / "train.jsonl", rows)
    write_jsonl(repo / "test.jsonl", [{"q": "held out", "a": "x"}])
    (repo / "README.md").write_text("# a test dataset\n", encoding="utf-8")
    cfg = {"source": "hub", "name": str(repo), "revision": "main", "seed": 1,
           "splits": {"train": "train", "test": "test"},
           "columns": {"prompt": "q", "completion": "a"},
           "validation_fraction": 0.1, "test_fraction": 0.1}
    splits = sources.fetch(cfg, "completion")
    assert splits["test"] == [{"prompt": "held out", "completion": "x"}]
    assert len(splits["validation"]) == 2 and len(splits["train"]) == 18
    message = input_error(sources.fetch, {**cfg, "splits": {"train": "train",
                                                            "validation": "dev"}}, "completion")
    assert str(repo) in message and "'dev'" in message and "expected" in message


def test_hub_missing_dataset_is_an_input_error(tmp_path, hub_cache):
    cfg = {"source": "hub", "name": str(tmp_path / "no-such-repo"), "revision": "main",
           "seed": 0, "validation_fraction": 0.1, "test_fraction": 0.1}
    message = input_error(sources.fetch, cfg, "completion")
    assert "no-such-repo" in message and "revision main" in message


# ---- bad input ---------------------------------------------------------------------------------

def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(completion_rows(1)[0]) + "\n\n{\"prompt\": \"x\",\n",
                    encoding="utf-8")
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: line 3: malformed JSON")
    assert "expected one JSON object per line" in message


def test_malformed_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  oops\n]', encoding="utf-8")
    message = input_error(sources.read_local, path)
    assert message.startswith(f"{path}: line 3: malformed JSON") and "expected" in message
    path.write_text('{"rows": []}', encoding="utf-8")
    message = input_error(sources.read_local, path)
    assert str(path) in message and "expected a JSON list" in message and "found dict" in message


@pytest.mark.parametrize("fmt, record, missing", [
    ("alpaca", {"instruction": "do it", "answer": "done"}, "output"),
    ("completion", {"prompt": "p"}, "completion"),
    ("chat", {"conversation": []}, "messages"),
])
def test_missing_required_column(tmp_path, fmt, record, missing):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    message = input_error(sources.fetch, local(path), fmt)
    assert message.startswith(f"{path}: line 1: missing required column(s) ['{missing}']")
    assert f"format '{fmt}'" in message and "expected" in message
    assert "dataset.columns" in message


def test_missing_column_in_csv_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,response\nhello,world\n", encoding="utf-8")
    message = input_error(sources.fetch, local(path), "alpaca")
    assert message.startswith(f"{path}: line 2: missing required column(s) ['output']")


def test_non_text_value(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", completion_rows(2) + [{"prompt": "p",
                                                                   "completion": 3}])
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: line 3: column 'completion': found int 3, expected text")


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"),
    ("empty.csv", ""), ("header-only.csv", "prompt,completion\n"),
])
def test_empty_dataset_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: the dataset is empty; expected")


def test_empty_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                             "completion": pa.array([], pa.string())}), path)
    message = input_error(sources.read_local, path)
    assert message.startswith(f"{path}: the dataset is empty; expected")


def test_broken_parquet_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    message = input_error(sources.read_local, path)
    assert message.startswith(f"{path}: not a readable parquet file") and "expected" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_file_names_the_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = {".jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "caf\u00e9", '
                      '"completion": "c"}\n',
            ".json": '[\n {"prompt": "a", "completion": "b"},\n {"prompt": "caf\u00e9", '
                     '"completion": "c"}\n]',
            ".csv": "prompt,completion\nb,a\ncaf\u00e9,c\n"}[suffix]
    path.write_bytes(text.encode("latin-1"))
    line = {".jsonl": 2, ".json": 3, ".csv": 3}[suffix]
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: line {line}: not valid UTF-8 (byte 0xe9")
    assert "expected a UTF-8 encoded file" in message


def test_non_utf8_after_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    data = (b"\xef\xbb\xbf" + b'{"prompt": "a", "completion": "b"}\n'
            + b'{"prompt": "\xff", "completion": "c"}\n')
    path.write_bytes(data)
    message = input_error(sources.read_local, path)
    # the offset counts from the file's first byte, the byte-order mark included
    offset = data.index(b"\xff")
    assert f"{path}: line 2: not valid UTF-8 (byte 0xff at offset {offset})" in message


@pytest.mark.parametrize("messages, wording", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "no assistant turn"),
    ([], "expected a non-empty list"),
    ([{"role": "user", "content": "u"}, {"role": "bot", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": None}], "messages[1]"),
    ("hello", "expected a non-empty list"),
    ([{"role": "user", "content": "u", "tool_calls": [{"name": "f", "arguments": {}}]},
      {"role": "assistant", "content": "a"}], "messages[0]: found {'role': 'user'"),
])
def test_bad_chat_records(tmp_path, messages, wording):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    message = input_error(sources.fetch, local(path), "chat")
    assert message.startswith(f"{path}: line 2: ")
    assert wording in message and "expected" in message


def test_record_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [["prompt", "completion"]])
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: line 1: expected an object") and "found list" in message


def test_csv_with_a_wrong_number_of_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    message = input_error(sources.read_local, path)
    assert message.startswith(f"{path}: line 3: 3 fields; expected 2")


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "data"])
def test_unsupported_file_type(tmp_path, name):
    path = tmp_path / name
    path.write_text("prompt\tcompletion\n", encoding="utf-8")
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: unsupported file type")
    assert "expected one of .jsonl, .json, .csv, .parquet" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    message = input_error(sources.fetch, local(path), "completion")
    assert message.startswith(f"{path}: dataset file not found") and "expected" in message


def test_unknown_source():
    message = input_error(sources.fetch, {"source": "ftp"}, "completion")
    assert "dataset.source" in message and "'ftp'" in message and "expected" in message


# ---- the fetch_dataset stage -------------------------------------------------------------------

def test_fetch_dataset_writes_the_three_splits_and_provenance(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i} \u00e9"},
                          {"role": "assistant", "content": f"a{i}"}], "ignored": i}
            for i in range(20)]
    cfg = local(write_jsonl(tmp_path / "in.jsonl", rows), seed=3)
    out = tmp_path / "results/raw"
    fetch_dataset(cfg, "chat", out, files=[cfg["path"]])
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "test.jsonl",
                                                     "train.jsonl", "validation.jsonl"]
    expected = sources.fetch(cfg, "chat")
    for split in ("validation", "test"):
        assert read_split(out, split) == expected[split]
    provenance = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["stage"] == "fetch_dataset"
    assert provenance["params"] == {"dataset": cfg, "format": "chat"}  # its seed: 3
    assert len(provenance["inputs"]["files"][0]["sha256"]) == 64
    assert [p.name for p in out.parent.iterdir()] == ["raw"]  # no temporary left behind


def test_read_split_keeps_unicode_line_separators(tmp_path):
    rows = [{"prompt": f"a\u2028b\u0085c {i}", "completion": "x"} for i in range(10)]
    cfg = local(write_jsonl(tmp_path / "in.jsonl", rows))
    fetch_dataset(cfg, "completion", tmp_path / "raw")
    assert read_split(tmp_path / "raw", "train") == sources.fetch(cfg, "completion")["train"]


@pytest.mark.parametrize("content", [
    '{"prompt": "a", "completion": "b"}\nnot json\n',
    '{"prompt": "a"}\n',
    "",
])
def test_fetch_dataset_failure_leaves_nothing(tmp_path, content):
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    parent = tmp_path / "results"
    with pytest.raises(InputError, match=re.escape(str(path))):
        fetch_dataset(local(path), "completion", parent / "raw")
    assert not (parent / "raw").exists()
    assert not parent.exists() or list(parent.iterdir()) == []


def test_fetch_dataset_failure_keeps_an_older_output(tmp_path):
    out = tmp_path / "raw"
    good = local(write_jsonl(tmp_path / "good.jsonl", completion_rows(10)))
    fetch_dataset(good, "completion", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(InputError):
        fetch_dataset(local(bad), "completion", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "raw"]


# ---- ShareGPT conversations --------------------------------------------------------------------

SHAREGPT = {"messages": "conversations"}  # dataset.columns for ShareGPT's column
TOOLS = [{"name": "add", "parameters": {"a": {"type": "integer"}}}]


def sharegpt_rows(n: int) -> list[dict]:
    """ShareGPT records, every role: a system turn, a tool call, its result, the answer; the
    function definitions as LLaMA-Factory writes them (JSON text; every other record none)."""
    return [{"conversations": [
        {"from": "system", "value": "Use the tools."}, {"from": "human", "value": f"{i} + 1?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": i}})},
        {"from": "tool" if i % 2 else "observation", "value": str(i + 1)},
        {"from": "gpt", "value": f"It is {i + 1}."}],
        "tools": json.dumps(TOOLS) if i % 2 else "[]"} for i in range(n)]


def as_chat(row: dict) -> dict:
    system, human, call, result, gpt = (turn["value"] for turn in row["conversations"])
    call = json.loads(call)
    return {"messages": [
        {"role": "system", "content": system}, {"role": "user", "content": human},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "content": result}, {"role": "assistant", "content": gpt}]} | (
        {"tools": TOOLS} if row["tools"] != "[]" else {})


def test_sharegpt_from_a_local_file_and_the_hub(tmp_path, hub_cache):
    rows = sharegpt_rows(20)
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    write_jsonl(tmp_path / "hub-sharegpt" / "train.jsonl", rows)
    (tmp_path / "hub-sharegpt" / "README.md").write_text("# ShareGPT\n", encoding="utf-8")
    hub = {"source": "hub", "name": str(tmp_path / "hub-sharegpt"), "revision": "main",
           "seed": 0, "columns": SHAREGPT, "validation_fraction": 0.1, "test_fraction": 0.1}
    for cfg in (local(path, columns=SHAREGPT), hub):
        splits = sources.fetch(cfg, "chat")
        assert sorted(map(key, all_records(splits))) == sorted(key(as_chat(r)) for r in rows)


@pytest.mark.parametrize("turn, wording", [
    ({"from": "human"}, "messages[1]: found {'from': 'human'}, expected {role: assistant|"
                        "system|tool|user, content: text} or ShareGPT's {from: human|gpt|"),
    ({"value": "hi"}, "messages[1]: found {'value': 'hi'}, expected {role: "),
    ({"from": "bot", "value": "hi"}, "messages[1]: found {'from': 'bot', 'value': 'hi'}"),
    ({"from": "observation", "value": "4"}, "messages[1]: a tool result (role 'tool') with no "
                                            "tool call before it"),
    ({"from": "function_call", "value": "add(2, 2)"}, "messages[1]: tool call 'add(2, 2)' is "
                                                      "not JSON"),
    ({"from": "function_call", "value": '{"arguments": {}}'}, "messages[1]: tool call "
                                                               "{'arguments': {}}: expected"),
])
def test_bad_sharegpt_records(tmp_path, turn, wording):
    bad = {"conversations": [{"from": "human", "value": "2 + 2?"}, turn,
                             {"from": "gpt", "value": "4"}]}
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(sharegpt_rows(1) + [bad]), encoding="utf-8")
    message = input_error(sources.fetch, local(path, columns=SHAREGPT), "chat")
    assert message.startswith(f"{path}: record 1: {wording}")
    assert "expected" in message and "\n" not in message


@pytest.mark.parametrize("tools, wording", [
    ("add(a)", "column 'tools': 'add(a)' is not JSON"),
    ({"name": "add"}, "column 'tools': found {'name': 'add'}, expected a list"),
])
def test_bad_function_definitions(tmp_path, tools, wording):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows(2) + [sharegpt_rows(1)[0]
                                                                       | {"tools": tools}])
    message = input_error(sources.fetch, local(path, columns=SHAREGPT), "chat")
    assert message.startswith(f"{path}: line 3: {wording}") and "\n" not in message
