"""A merged model written as GGUF files with llama.cpp's own tools: its converter
(convert_hf_to_gguf.py, which writes f32/f16/bf16/q8_0) and, for llama.cpp's other types
(q4_k_m, q6_k, ...), its quantizer (llama_model_quantize through llama-cpp-python) applied to
the f16 file, as llama.cpp's own workflow does.

No converter is written here: the tensor layouts (Llama's rotary permutation, tied
embeddings), the tokenizer's pre-tokenizer and the chat template are llama.cpp's business,
and its converter is what every llama.cpp, Ollama and LM Studio user runs. `make setup`
unpacks it, with the gguf-py it is written against, from the llama-cpp-python source
distribution whose llama.cpp it builds (envs/install-llama-cpp.sh).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ..core.errors import InputError

log = logging.getLogger(__name__)

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py --outtype
FLOAT_TYPES = ("f32", "f16", "bf16")  # rounding only: greedy answers must agree (stages/export)
ENV = "QLORA_LLAMA_CPP"  # a llama.cpp checkout (or unpacked sdist) to take the converter from


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py and gguf-py: $QLORA_LLAMA_CPP, or where
    envs/install-llama-cpp.sh unpacked them in this environment."""
    folder = Path(os.environ.get(ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    missing = [name for name in ("convert_hf_to_gguf.py", "gguf-py")
               if not (folder / name).exists()]
    if missing:
        raise InputError(f"export.gguf: llama.cpp's converter not found: no {missing[0]} in "
                         f"{folder}; expected llama.cpp's convert_hf_to_gguf.py and gguf-py "
                         f"there (`make setup` unpacks them; or set {ENV} to a llama.cpp "
                         f"checkout)")
    return folder


def convert(model_dir: Path, out_file: Path, gguf_type: str) -> None:
    """Run llama.cpp's converter on a Hugging Face model folder."""
    folder = converter_dir()
    # The converter runs against its own gguf-py (the PyPI gguf the importer uses may be
    # older or newer): first on its path, in its own process.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(folder / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", gguf_type, "--outfile", str(out_file)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} "
                           f"(--outtype {gguf_type}, exit {done.returncode}):\n{tail}")


def quantize(f16_file: Path, out_file: Path, gguf_type: str, threads: int) -> None:
    """llama.cpp's quantizer (what the llama-quantize tool calls) on an f16 GGUF."""
    llama_cpp = require_llama_cpp(f"export.type {gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(),
                                            ctypes.byref(params))
    if status != 0 or not out_file.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed on {f16_file} (type {gguf_type}, "
                           f"status {status})")


def require_llama_cpp(what: str):
    """The llama_cpp module (llama-cpp-python), or a one-line error naming what needs it."""
    try:
        import llama_cpp
    except ImportError:
        raise InputError(f"{what}: llama-cpp-python is not installed; expected it in this "
                         f"environment (`make setup` builds it; or set export.check.llama_cpp "
                         f"to false and use converter types {', '.join(CONVERTER_TYPES)} only)"
                         ) from None
    return llama_cpp


def export(model_dir: Path, folder: Path, task: str, types: list[str], threads: int) -> dict:
    """Every requested type written into `folder`: {type: {file, bytes, seconds}}. The f16
    file a quantizer type starts from is made once, and kept only when asked for."""
    written = {}
    f16 = folder / f"{task}-f16.gguf"
    for gguf_type in sorted(types, key=lambda t: t not in CONVERTER_TYPES):  # f16 first
        out = folder / f"{task}-{gguf_type}.gguf"  # layout.gguf: <task>-<type>.gguf
        started = time.perf_counter()
        if gguf_type in CONVERTER_TYPES:
            convert(model_dir, out, gguf_type)
        else:
            if not f16.exists():
                convert(model_dir, f16, "f16")
            quantize(f16, out, gguf_type, threads)
        seconds = time.perf_counter() - started
        written[gguf_type] = {"file": out.name, "bytes": out.stat().st_size,
                              "seconds": round(seconds, 2)}
        log.info("GGUF %s: %s, %.1f MiB, %.1f s", gguf_type, out.name,
                 out.stat().st_size / 2 ** 20, seconds)
    if "f16" not in types and f16.exists():
        f16.unlink()  # only the intermediate of a quantizer type
    return written
