"""The bytes each model stage will write, estimated from the model's shapes (memory.Shapes)
before anything loads, and the refusal of a stage whose folders cannot hold them; a full disk
met while writing anyway (ENOSPC) told in one line (docs/cluster.md, "Disk space").

The estimates are upper bounds: weights at their stored or saved width, side files (the
tokenizer a stage copies, its JSON records) at TOKEN_BYTES per vocabulary entry plus
RECORD_BYTES, and every file a stage holds at once (a training's kept checkpoints, the f16
GGUF a quantized type is made from). `QLORA_SKIP_DISK_CHECK=1` turns the refusal into a
warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from .errors import DiskFull
from .memory import TRAINABLE_BYTES, Shapes, lora_params, quantized_bytes

log = logging.getLogger(__name__)
SKIP_ENV = "QLORA_SKIP_DISK_CHECK"
MIB = 2 ** 20
# tokenizer.json, vocab and merges of a BPE tokenizer (SmolLM2's 49152 entries: 3.5 MB), or a
# GGUF's token table: below 128 bytes per entry.
TOKEN_BYTES = 128
RECORD_BYTES = 256 * 2 ** 10  # JSON records beside the weights: quantization.json, metrics
# Checkpoints a training keeps at once: save_total_limit 2 (training/loop.py) plus the best
# one (load_best_model_at_end), and the one being written before the oldest goes.
KEPT_CHECKPOINTS = 4
# GGUF bits per parameter: float types exact, converter and quantizer types at most q8_0's.
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16}
GGUF_QUANTIZED_BITS = 8.5


def side_bytes(shapes: Shapes) -> int:
    return (shapes.vocab or 0) * TOKEN_BYTES + RECORD_BYTES


def model_bytes(shapes: Shapes, width: int) -> int:
    """A full-precision checkpoint at `width` bytes per parameter, with its side files."""
    return shapes.params * width + side_bytes(shapes)


def weights_bytes(parameters, vocab: int) -> int:
    """A loaded model's parameters (torch tensors) as saved, with its side files."""
    return sum(p.numel() * p.element_size() for p in parameters) + vocab * TOKEN_BYTES \
        + RECORD_BYTES


def quantized_model_bytes(shapes: Shapes, bits: float) -> int:
    """The quantized checkpoint: block weights at `bits`, the rest as the base stores it."""
    stored_width = -(-shapes.stored_bytes // max(shapes.params, 1))  # rounded up
    return quantized_bytes(shapes, stored_width, bits) + side_bytes(shapes)


def adapter_bytes(shapes: Shapes, lora: dict) -> int:
    """The adapter's float32 weights, three times for a LoftQ/PiSSA one (initial/, converted/)."""
    copies = 3 if lora.get("init") in ("loftq", "pissa") else 1
    return copies * lora_params(shapes, lora) * 4 + side_bytes(shapes)


def checkpoint_bytes(shapes: Shapes, lora: dict, optimizer: str) -> int:
    """KEPT_CHECKPOINTS of the adapter's weights and the optimizer's state (memory.py's bytes
    per trainable parameter, less the gradient, which is not saved)."""
    per_param = TRAINABLE_BYTES.get(optimizer, 16) - 4
    return KEPT_CHECKPOINTS * (lora_params(shapes, lora) * per_param + RECORD_BYTES)


def gguf_bytes(shapes: Shapes, types: list[str]) -> int:
    """Every requested GGUF type, and the f16 file a quantizer type is made from."""
    bits = [GGUF_BITS.get(t, GGUF_QUANTIZED_BITS) for t in types]
    if any(t not in GGUF_BITS for t in types) and "f16" not in types:
        bits.append(16)
    return sum(int(shapes.params * b / 8) + side_bytes(shapes) for b in bits)


def nearest_folder(path: str | Path) -> Path:
    """`path`, or the folder above it that exists (an output's folder may not yet)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def check(stage: str, writes: dict) -> dict:
    """Refuse `stage` (DiskFull) where the bytes it writes (`writes`: output path → bytes)
    exceed the free space of the filesystem holding the output's folder (outputs on one
    filesystem add up). Returns what was checked, logged."""
    needed, where = defaultdict(int), {}
    for path, size in writes.items():
        folder = nearest_folder(Path(path).parent)  # where it lands, not a job's temporary
        needed[folder.stat().st_dev] += size
        where.setdefault(folder.stat().st_dev, folder)
    record = {}
    for device, size in needed.items():
        folder, free = where[device], shutil.disk_usage(where[device]).free
        record[str(folder)] = {"needed_bytes": size, "free_bytes": free}
        log.info("disk estimate of %s: %.1f MiB into %s; %.1f MiB free", stage, size / MIB,
                 folder, free / MIB)
        if size > free:
            message = (f"{stage}: needs {size / MIB:.1f} MiB ({size} bytes) in {folder}, "
                       f"{free / MIB:.1f} MiB ({free} bytes) free; expected room for the "
                       f"outputs: free space there or a larger disk ({SKIP_ENV}=1 runs it "
                       f"anyway)")
            if os.environ.get(SKIP_ENV) != "1":
                raise DiskFull(message)
            log.warning("%s", message)
    return record


def check_stage(stage: str, model_dir: str | Path, writes: dict, *, width: int = 4,
                bits: float = 0.0, lora: dict | None = None, optimizer: str = "adamw_torch",
                types: tuple = ()) -> dict:
    """`check` of what a stage writes into each folder (`writes`: path → the kinds it holds:
    "model" at `width` bytes per parameter, "quantized" at `bits`, "adapter" and
    "checkpoints" of `lora` trained by `optimizer`, "gguf" of `types`, "records"), from the
    shapes of the checkpoint in `model_dir`."""
    shapes = Shapes.from_checkpoint(model_dir)
    if not (shapes.hidden and shapes.layers):  # as memory.check_stage: no estimate, no refusal
        log.warning("no disk estimate of %s: %s/config.json gives no hidden size or layers",
                    stage, model_dir)
        return {}
    sizes = {"model": lambda: model_bytes(shapes, width),
             "quantized": lambda: quantized_model_bytes(shapes, bits),
             "adapter": lambda: adapter_bytes(shapes, lora),
             "checkpoints": lambda: checkpoint_bytes(shapes, lora, optimizer),
             "gguf": lambda: gguf_bytes(shapes, list(types)), "records": lambda: RECORD_BYTES}
    return check(stage, {path: sum(sizes[kind]() for kind in kinds)
                         for path, kinds in writes.items()})


FULL = (errno.ENOSPC, errno.EDQUOT)


def full_disk(err: BaseException | None) -> BaseException | None:
    """The ENOSPC (or quota) error behind `err`: an OSError, or a library's own error that
    quotes it (safetensors' Rust writer raises SafetensorError "...No space left on device")."""
    while err is not None:
        if getattr(err, "errno", None) in FULL or any(os.strerror(code) in str(err)
                                                        for code in FULL):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def torch_writes(folder: str | Path, needed: int) -> Iterator[None]:
    """torch.save's writer reports a full disk without errno ("unexpected pos 704 vs 598",
    "file write failed"): a RuntimeError from the block while `folder`'s disk has less free
    space than `needed` bytes (what the block writes at least) is ENOSPC, at `folder`."""
    try:
        yield
    except RuntimeError as err:
        if full_disk(err) or shutil.disk_usage(nearest_folder(folder)).free >= needed:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from err


def refusal(stage: str, err: BaseException, outputs: dict) -> DiskFull:
    """One line for a write that found the disk full: the output, the file, the space left."""
    names = ", ".join(str(path) for path in outputs.values())
    folder = nearest_folder(next(iter(outputs.values()), "."))
    free = shutil.disk_usage(folder).free
    at = f" (at {err.filename})" if getattr(err, "filename", None) else ""
    return DiskFull(f"{stage}: no space left on device writing {names}{at}; "
                    f"{free / MIB:.1f} MiB ({free} bytes) free in {folder}; "
                    f"nothing was kept; expected room for the outputs: free space there or a "
                    f"larger disk")
