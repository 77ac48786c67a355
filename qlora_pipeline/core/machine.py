"""The facts about the machine that change a job's numerics or speed, for provenance.json.

Libraries pick kernels by CPU flag (bitsandbytes' AVX512-BF16 path, torch's AVX512 and AMX
kernels), so two runs of the same config on two CPUs may differ; the record says which
machine a number came from.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# CPU flags that select different kernels in torch or bitsandbytes.
NUMERIC_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                 "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model name and which of NUMERIC_FLAGS it has (Linux; elsewhere the model only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() in ("flags", "Features"):
            flags |= set(value.split())
        if model and flags:
            break
    return {"model": model, "cores": os.cpu_count(),
            "numeric_flags": [f for f in NUMERIC_FLAGS if f in flags]}


def torch_info() -> dict:
    """Threads torch uses and the CPU kernel family it picked (only if torch is loaded)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    info = {"threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0),
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    return info


def bitsandbytes_info() -> dict:
    """Which native library bitsandbytes loaded, and whether its packed CPU kernel exists
    here (it is switched off: models/numerics.py). Only if the job used bitsandbytes."""
    if "bitsandbytes" not in sys.modules:
        return {}
    from bitsandbytes import cextension
    from bitsandbytes.functional import has_avx512bf16

    library = getattr(getattr(cextension.lib, "_lib", None), "_name", None)
    return {"native_library": Path(library).name if library else None,
            "cpu_avx512bf16_kernel_available": bool(has_avx512bf16()),
            "cpu_packed_inference": "disabled"}


def facts() -> dict:
    return {"cpu": cpu_info(), "torch": torch_info(), "bitsandbytes": bitsandbytes_info(),
            "platform": platform.platform()}
