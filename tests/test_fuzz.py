"""Bad input at volume (issue 35): hypothesis feeds the readers random and broken configs,
dataset files, adapter folders and GGUF files. Each is read, or refused with an InputError
whose first line names the file or key; never another exception, and nothing left behind.
Chat templates that reach for Python objects fail in every place one is rendered.

CI runs a fixed, derandomized sample; QLORA_FUZZ_EXAMPLES=2000 runs that many per test, and
-s prints the inputs tried per kind."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest
from conftest import stage, task_blocks, write_yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qlora_pipeline.config import load_config, read_configfiles
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.data import formats, sources
from qlora_pipeline.models import adapter_file, importer

EXAMPLES = int(os.environ.get("QLORA_FUZZ_EXAMPLES", "0"))
TRIED: collections.Counter = collections.Counter()  # inputs tried per kind (the note)


def fuzz(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def counts():
    yield
    print("\ninputs tried per kind:", dict(TRIED))


def refused(call, *names) -> str | None:
    """None where `call` succeeds; else its InputError's message, whose first line names one
    of `names` (a file, a folder, a key). Any other exception fails the test."""
    try:
        call()
    except InputError as err:
        first = str(err).splitlines()[0]
        assert any(str(name) in first for name in names), (names, str(err))
        return str(err)
    return None


def scratch(tmp_path: Path, name: str) -> Path:
    """A fresh folder per example (hypothesis reuses the test's tmp_path)."""
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ---- values ---------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats()
           | st.text(max_size=12))


def values(keys=st.text(max_size=8)):
    return st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(keys, inner, max_size=4), max_leaves=12)


# ---- config files and overlays ---------------------------------------------------------------

TASK = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                      "num_examples": 20}}
CONFIG = {"tasks": ["arithmetic"], "base_model": {"source": "local", "path": "/models/tiny"},
          "defaults": {"train": {"max_steps": 4}}}


def paths(tree, prefix=()):
    """Every key path of a nested mapping: where a mutation may land."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, (*prefix, key))


def schema_words() -> list[str]:
    """Every key the schemas name, so that mutations reach past the unknown-key check."""
    from qlora_pipeline.config.schema import load_schema

    words = set()

    def walk(node):
        if isinstance(node, dict):
            words.update(k for k in node.get("properties", {}) if isinstance(k, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(load_schema("config.schema.yaml"))
    walk(load_schema("task.schema.yaml"))
    return sorted(words)


KEYS = st.sampled_from(schema_words()) | st.text(max_size=8)


def filled(tree: dict, schema: str) -> dict:
    """`tree` with the schema's defaults: every key a mutation may reach."""
    from qlora_pipeline.config.schema import load_schema, validate

    return validate(copy.deepcopy(tree), load_schema(schema), "test")


def like(value):
    """A value of the type `value` has (reaching the checks past the schema's type check)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 2**20)
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.text(max_size=8) | st.sampled_from(["", "auto", "none", "fsdp", "ddp"])
    if isinstance(value, list):
        return st.lists(like(value[0]) if value else SCALARS, max_size=3)
    return values(KEYS)


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with a few keys set to values of their type or any, or a key added."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(tree))[1:]))
        node = tree
        for key in path[:-1]:
            node = node[key]
        how = draw(st.sampled_from(["like", "like", "any", "add"]))
        if how == "add" and isinstance(node[path[-1]], dict):
            node[path[-1]][draw(KEYS)] = draw(values(KEYS))
        else:
            node[path[-1]] = draw(like(node[path[-1]]) if how != "any" else values(KEYS))
    return tree


def check_config(root: Path, files: list[Path], overrides: dict | None = None) -> None:
    """What the workflow does when it is parsed (rules/common.smk)."""
    names = [*files, root / "config" / "tasks", "config", "key", "task"]
    TRIED["config"] += 1

    def parse():
        load_config(read_configfiles(files, overrides), root=root)
    refused(parse, *names)


@fuzz(150)
@given(overlay=mutated(filled(CONFIG, "config.schema.yaml")),
       task=mutated(filled(TASK, "task.schema.yaml")))
def test_configs_and_task_files_are_read_or_refused_by_key(tmp_path, overlay, task):
    root = scratch(tmp_path, "root")
    write_yaml(root / "config/tasks/arithmetic.yaml", task)
    base = write_yaml(root / "config/config.yaml", CONFIG)
    check_config(root, [base, write_yaml(root / "overlay.yaml", overlay)])


@pytest.mark.parametrize("overlay", [{"quantization": True}, {"base_model": None}])
def test_a_block_of_another_type_is_refused_by_key(tmp_path, overlay):
    """Two the fuzzing found: a TypeError each, before the schema could name the key."""
    write_yaml(tmp_path / "config/tasks/arithmetic.yaml", TASK)
    files = [write_yaml(tmp_path / "config.yaml", CONFIG), write_yaml(tmp_path / "o.yaml", overlay)]
    message = refused(lambda: load_config(read_configfiles(files), root=tmp_path), "config")
    assert f"key '{next(iter(overlay))}'" in message


@fuzz(60)
@given(overrides=st.dictionaries(KEYS, st.text(max_size=12) | values(KEYS), max_size=3))
def test_config_overrides_are_typed_or_refused_by_key(tmp_path, overrides):
    root = scratch(tmp_path, "root")
    write_yaml(root / "config/tasks/arithmetic.yaml", TASK)
    check_config(root, [write_yaml(root / "config/config.yaml", CONFIG)], overrides)


@fuzz(60)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_files_of_random_bytes_are_refused_by_file(tmp_path, data):
    root = scratch(tmp_path, "root")
    write_yaml(root / "config/tasks/arithmetic.yaml", TASK)
    path = root / "bytes.yaml"
    path.write_bytes(data)
    check_config(root, [write_yaml(root / "config/config.yaml", CONFIG), path])


@pytest.mark.parametrize("text", ["[" * 100_000, "a: " * 30_000 + "1", b"\xff\xfe: 1"])
def test_deep_or_undecodable_config_files_are_refused_by_file(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    assert refused(lambda: read_configfiles([path]), path)


# ---- dataset files ---------------------------------------------------------------------------

FIELDS = ("prompt", "completion", "instruction", "input", "output", "messages", "role",
          "content", "from", "value", "tools", "tool_calls", "label", "choices")
RECORD_VALUES = values(st.sampled_from(FIELDS) | st.text(max_size=6))
RECORDS = st.lists(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), RECORD_VALUES,
                                   max_size=5) | RECORD_VALUES, min_size=1, max_size=4)


@st.composite
def jsonl_bytes(draw) -> bytes:
    """JSON lines with what real files bring: a BOM, CRLF, a repeated key, another encoding."""
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in draw(RECORDS)]
    if draw(st.booleans()):  # a key repeated in the first object
        lines[0] = lines[0].replace("{", '{"prompt": "x", "prompt": "y", ', 1)
    text = ("\r\n" if draw(st.booleans()) else "\n").join(lines)
    return encoded(draw, text)


@st.composite
def csv_bytes(draw) -> bytes:
    cells = st.sampled_from(["NaN", "nan", "inf", "-inf", "1e999", '"a, b"', '"x""y"', "",
                             '"line\nbreak"', "é"]) | st.text(max_size=8)
    header = draw(st.lists(st.sampled_from(FIELDS[:5]) | st.text(max_size=4), min_size=1,
                           max_size=3))
    rows = draw(st.lists(st.lists(cells, min_size=1, max_size=4), max_size=4))
    newline = "\r\n" if draw(st.booleans()) else "\n"
    return encoded(draw, newline.join(",".join(row) for row in [header, *rows]))


def encoded(draw, text: str) -> bytes:
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


def check_dataset(path: Path, fmt: str) -> str | None:
    """Read as the fetch_dataset stage reads a local file; what reads must be writable."""
    TRIED[f"dataset {path.suffix}"] += 1

    def read():
        for record in sources._prepare(sources.read_local(path), {}, fmt):
            json.dumps(record, ensure_ascii=False).encode("utf-8")  # as the split file holds it
    return refused(read, path)


FORMATS = st.sampled_from(sorted(formats.REQUIRED))


@fuzz(120)
@given(data=jsonl_bytes(), fmt=FORMATS, suffix=st.sampled_from([".jsonl", ".json"]))
def test_json_datasets_are_read_or_refused_by_file(tmp_path, data, fmt, suffix):
    path = scratch(tmp_path, "data") / f"train{suffix}"
    if suffix == ".json":  # the same records as one list
        data = b"[" + b",".join(line for line in data.splitlines() if line.strip()) + b"]"
    path.write_bytes(data)
    check_dataset(path, fmt)


@fuzz(80)
@given(data=csv_bytes(), fmt=FORMATS)
def test_csv_datasets_are_read_or_refused_by_file(tmp_path, data, fmt):
    path = scratch(tmp_path, "data") / "train.csv"
    path.write_bytes(data)
    check_dataset(path, fmt)


@fuzz(80)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(sorted(sources.READERS)),
       fmt=FORMATS)
def test_datasets_of_random_bytes_are_read_or_refused_by_file(tmp_path, data, suffix, fmt):
    path = scratch(tmp_path, "data") / f"train{suffix}"
    path.write_bytes(data if suffix != ".parquet" else b"PAR1" + data + b"PAR1")
    check_dataset(path, fmt)


COLUMN = st.sampled_from([st.text(max_size=8), st.integers(-9, 9), st.floats(),
                          st.binary(max_size=4), st.datetimes(), st.lists(st.text(max_size=3))])


@fuzz(30)
@given(data=st.data(), names=st.lists(st.sampled_from(FIELDS[:5] + ("label", "choices")),
                                      min_size=1, max_size=4, unique=True), fmt=FORMATS)
def test_parquet_columns_of_any_type_are_read_or_refused_by_row(tmp_path, data, names, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = data.draw(st.integers(1, 3))
    columns = {name: data.draw(st.lists(st.none() | data.draw(COLUMN), min_size=rows,
                                        max_size=rows)) for name in names}
    path = scratch(tmp_path, "data") / "train.parquet"
    pq.write_table(pa.table(columns), path)
    check_dataset(path, fmt)


DEEP = {"deep.jsonl": "[" * 100_000, "deep.json": '{"a":' * 50_000,
        "twice.jsonl": '{"prompt": "a", "completion": "b", "prompt": "c"}',
        "surrogate.jsonl": '{"prompt": "\\ud800", "completion": "b"}'}


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_repeated_or_unwritable_json_is_refused_by_line(tmp_path, name):
    path = tmp_path / name
    path.write_text(DEEP[name], encoding="utf-8")
    message = check_dataset(path, "completion")
    assert message and "\n" not in message and ("line 1" in message or name.endswith(".json"))


def test_a_one_megabyte_record_reads_in_every_text_format(tmp_path):
    long = "x" * 2**20
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": long, "completion": "b"}))
    (tmp_path / "a.csv").write_text(f"prompt,completion\r\n{long},b\r\n")
    for path in tmp_path.iterdir():
        assert sources.read_local(path)[0][1]["prompt"] == long


def test_a_refused_dataset_leaves_no_split_behind(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DEEP["deep.jsonl"])
    dataset = {"source": "local", "path": str(bad), "seed": 0, "validation_fraction": 0.1,
               "test_fraction": 0.1, "columns": {}}
    with pytest.raises(InputError, match="bad.jsonl: line 1"):
        stage("fetch_dataset")(raw=tmp_path / "raw", dataset=dataset, format="completion")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ---- adapter folders -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A whole LoRA adapter of the tiny model, nonzero (as trained)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    return folder


def _truncate(data: bytes, draw) -> bytes:
    return data[:draw(st.integers(0, max(len(data) - 1, 0)))]


def _flip(data: bytes, draw) -> bytes:
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]


def _wrong_shape(folder: Path, draw) -> None:
    """One factor saved with another size: as an adapter trained on another model."""
    from safetensors.torch import load_file, save_file

    path = folder / adapter_file.WEIGHTS
    tensors = load_file(path)
    key = draw(st.sampled_from(sorted(tensors)))
    r, n = tensors[key].shape
    side = draw(st.sampled_from([0, 1]))
    shape = (r + draw(st.integers(1, 8)), n) if side == 0 else (r, n + draw(st.integers(1, 8)))
    tensors[key] = tensors[key].new_zeros(shape)
    save_file(tensors, path)


@st.composite
def damage(draw, folder: Path) -> str:
    """One way an adapter folder is broken, applied to `folder`; its name."""
    config, weights = folder / "adapter_config.json", folder / adapter_file.WEIGHTS
    kind = draw(st.sampled_from(["missing", "truncated", "flipped", "garbage", "config value",
                                 "wrong shape"]))
    file = draw(st.sampled_from([config, weights]))
    if kind == "missing":
        file.unlink()
    elif kind in ("truncated", "flipped"):
        file.write_bytes((_truncate if kind == "truncated" else _flip)(file.read_bytes(), draw))
    elif kind == "garbage":
        file.write_bytes(draw(st.binary(max_size=64)))
    elif kind == "config value":
        settings_ = json.loads(config.read_text())
        settings_[draw(st.sampled_from(sorted(settings_)))] = draw(values())
        config.write_text(json.dumps(draw(st.just(settings_) | values())))
    else:
        _wrong_shape(folder, draw)
    return kind


@fuzz(120)
@given(data=st.data())
def test_broken_adapter_folders_are_refused_by_file(tmp_path, adapter, tiny_model_dir, data):
    folder = scratch(tmp_path, "a") / "adapter"
    shutil.copytree(adapter, folder)
    kind = data.draw(damage(folder))
    TRIED[f"adapter: {kind}"] += 1
    message = refused(lambda: adapter_file.check(folder, tiny_model_dir), folder)
    # A flip in a float's bits, or a setting changed to another valid one, may stay valid.
    if message is None:
        assume(kind in ("flipped", "config value"))
        refused(lambda: adapter_file.read_adapter(folder), folder)


BROKEN = {"no weights": lambda f: (f / adapter_file.WEIGHTS).unlink(),
          "truncated": lambda f: (f / adapter_file.WEIGHTS).write_bytes(
              (f / adapter_file.WEIGHTS).read_bytes()[:-100]),
          "config not JSON": lambda f: (f / "adapter_config.json").write_text("{r: 4"),
          "wrong base": lambda f: _reshaped(f), "pickled": lambda f: _pickled(f)}


def _pickled(folder: Path) -> None:
    """The weights as torch.save writes them (.bin): unpickling can run code, never read."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / adapter_file.WEIGHTS), folder / "adapter_model.bin")
    (folder / adapter_file.WEIGHTS).unlink()


def _broken(adapter: Path, into: Path, how: str) -> Path:
    folder = into / f"adapter-{how.replace(' ', '-')}"
    shutil.copytree(adapter, folder)
    BROKEN[how](folder)
    return folder


def _reshaped(folder: Path) -> None:
    """Every lora_A with twice its inputs: an adapter trained on a wider model."""
    from safetensors.torch import load_file, save_file

    path = folder / adapter_file.WEIGHTS
    tensors = load_file(path)
    save_file({k: t.repeat(1, 2) if "lora_A" in k else t for k, t in tensors.items()}, path)


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_merge_combine_and_chat_refuse_a_broken_adapter(tmp_path, adapter, tiny_model_dir, how):
    from qlora_pipeline import chat

    folder = _broken(adapter, tmp_path, how)
    names = (folder, "merge:")
    out = tmp_path / "out"
    out.mkdir()
    assert refused(lambda: stage("merge")(
        base=tiny_model_dir, quantized=tiny_model_dir, adapter=folder, tokenized=tiny_model_dir,
        merge=task_blocks()["merge"], merged=out / "merged", recovered=False), *names)
    if how != "wrong base":  # combined adapters share no base folder: another check refuses
        assert refused(lambda: stage("combine_adapters")(
            adapters=[adapter, folder], combined=out / "combined", seed=0,
            combination={"name": "c", "method": "cat", "weights": [1.0, 1.0], "density": None,
                         "svd_rank": None, "tasks": ["one", "two"]}), *names)
    args = chat.parse_args(["--task", "t"])
    assert refused(lambda: chat.load(args, {"base": tiny_model_dir, "adapter": folder}), *names)
    assert list(out.iterdir()) == []  # nothing left behind, not even a temporary


# ---- GGUF files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """A small well-formed GGUF file (metadata and two tensors), as the gguf package writes."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file):
        write()
    writer.close()
    return path


@fuzz(150)
@given(data=st.data())
def test_truncated_or_misnamed_gguf_files_are_refused_by_file(tmp_path, gguf_file, data):
    whole = gguf_file.read_bytes()
    kind = data.draw(st.sampled_from(["truncated", "magic", "random"]))
    if kind == "truncated":
        broken = _truncate(whole, data.draw)
    elif kind == "magic":
        broken = data.draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != b"GGUF")) \
            + whole[4:]
    else:
        broken = b"GGUF" + struct.pack("<I", 3) + data.draw(st.binary(max_size=200))
    path = scratch(tmp_path, "g") / "model.gguf"
    path.write_bytes(broken)
    TRIED[f"gguf: {kind}"] += 1
    if refused(lambda: importer.gguf_dtype(path), path) is None:  # only the end's padding cut
        import gguf

        tensors = gguf.GGUFReader(gguf_file).tensors
        assert kind == "truncated" and len(broken) >= max(t.data_offset + t.n_bytes
                                                          for t in tensors)


def test_a_broken_gguf_is_refused_by_the_importer_and_llama_cpp(tmp_path, gguf_file):
    from qlora_pipeline.models.generation import LlamaCppModel

    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_file.read_bytes()[:100])
    out = tmp_path / "out"
    out.mkdir()
    assert refused(lambda: stage("import_base_model")(
        base=out / "base", base_model={"source": "gguf", "path": str(path), "dtype": "auto"}),
        path)
    assert refused(lambda: LlamaCppModel(str(path), threads=1), path)
    assert list(out.iterdir()) == []


# ---- chat templates in a sandbox -------------------------------------------------------------

ESCAPES = ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
           "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
           "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}"]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_template_reaching_python_fails_in_one_line(tiny_tokenizer, template, tmp_path,
                                                      monkeypatch):
    """Our renders (data formats, scoring prompts, qlora-chat) go through transformers'
    apply_chat_template, a hub, local or GGUF base's template alike: jinja2's sandbox."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="chat template reaches for Python objects") as info:
        formats.segments({"messages": CHAT}, "chat", tokenizer)
    assert "\n" not in str(info.value) and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("template", ESCAPES)
def test_llama_cpp_renders_a_gguf_template_in_a_sandbox(template, tmp_path, monkeypatch):
    """llama-cpp-python renders a GGUF's own template (create_chat_completion) with its
    Jinja2ChatFormatter; qlora-chat --gguf sends it text rendered by the base's tokenizer
    instead, but the formatter must not run what a file brings either."""
    from jinja2.exceptions import TemplateError

    formatter = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError):
        formatter(template, eos_token="", bos_token="")(messages=CHAT)
    assert not (tmp_path / "pwned").exists()


# ---- code that files bring stays inert -------------------------------------------------------

def test_a_base_needing_its_own_code_is_refused_without_running_it(tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "custom", "auto_map": {"AutoConfig": "custom.Config",
                                                   "AutoModelForCausalLM": "custom.Model"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("open('ran', 'w').close()\n"
                                      "from transformers import LlamaConfig as Config\n"
                                      "from transformers import LlamaForCausalLM as Model\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert refused(lambda: stage("import_base_model")(base=out / "base", base_model={
        "source": "local", "path": str(folder), "dtype": "auto", "trust_remote_code": False}),
        "base_model.path")
    assert list(out.iterdir()) == [] and not (tmp_path / "ran").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="another user is played by root's setuid")
def test_the_warm_start_socket_refuses_another_user():
    """The socket is its owner's alone (mode 0600), and a connection from another uid (the
    file opened to all, as a shared /tmp might be) is refused by its peer credentials."""
    from qlora_pipeline.jobs import warm_start

    folder = tempfile.mkdtemp()  # in /tmp, which the other user can reach
    os.chmod(folder, 0o755)
    address = os.path.join(folder, "warm.sock")
    try:
        listener = warm_start._listen(address)
        listener.settimeout(30)
        assert os.stat(address).st_mode & 0o777 == 0o600
        os.chmod(address, 0o777)
        pid = os.fork()
        if pid == 0:  # the other user: connects, sends a request's header, leaves
            _as_nobody(address)
        conn, _ = listener.accept()
        with conn, listener, pytest.raises(PermissionError, match="peer uid 65534"):
            warm_start._read_request(conn)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        shutil.rmtree(folder)


def _as_nobody(address: str) -> None:
    status = 1
    try:
        os.setuid(65534)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(address)
            status = 0  # connected; the server may refuse before the request is sent
            with contextlib.suppress(OSError):
                socket.send_fds(conn, [struct.pack("!Q", 2)], [0, 1, 2])
                conn.sendall(b"{}")
    finally:
        os._exit(status)  # never back into pytest
