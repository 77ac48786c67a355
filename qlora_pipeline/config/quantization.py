"""The quantization settings of a run, settled at parse time: each method's own keys with
their defaults (declared by the method's module, models/methods/), the others refused, and the
sweep's points named by the method.

Only the keys a method reads reach the quantize rule's params, so that editing, say,
`group_size` while the method is nf4 reruns nothing.
"""

from __future__ import annotations

from ..core.errors import InputError
from ..models import methods

COMMON = ("method", "compute_dtype", "skip_modules")  # every method reads these


def settle(settings: dict, where: str, fsdp: bool = False) -> dict:
    """`settings` (schema-validated) with the method's defaults; an unknown method, or a key
    of another method, is refused, naming it. `fsdp`: a task trains with FSDP, which shards
    only float tensors."""
    method = settings["method"]
    if method not in methods.MODULES:
        raise InputError(f"config key '{where}.method': found {method!r}; expected one of "
                         f"{', '.join(methods.MODULES)}")
    keys = methods.of(method).KEYS
    for key in sorted(set(settings) - set(keys) - set(COMMON)):
        if key == "quant_storage" and settings[key] == "auto":  # the schema's default
            continue
        users = [name for name, module in methods.MODULES.items() if key in module.KEYS]
        raise InputError(f"config key '{where}.{key}': found it with method '{method}'; it "
                         f"applies to method {' or '.join(users)} only, expected it left out")
    settled = {**keys, **{k: v for k, v in settings.items() if k in COMMON or k in keys}}
    if "quant_storage" in keys and settled["quant_storage"] == "auto":
        settled["quant_storage"] = "compute" if fsdp else "uint8"
    elif fsdp and "quant_storage" not in keys:
        raise InputError(f"config key '{where}.method': found '{method}' with a task trained "
                         f"with train.distributed.strategy fsdp; expected nf4 or fp4 (FSDP "
                         f"shards the 4-bit weights stored as floats), or strategy ddp")
    return settled


def label(settings: dict) -> str:
    """A sweep point's name: nf4, nf4-nodq, int8, hqq3-g64."""
    return methods.of(settings["method"]).label(settings)


def sweep(config: dict) -> dict[str, dict]:
    """label -> settings of each `quantization_sweep` entry, with quantization's compute_dtype
    and skip_modules; two entries of one label are refused."""
    base = {k: config["quantization"][k] for k in ("compute_dtype", "skip_modules")}
    points: dict[str, dict] = {}
    for i, entry in enumerate(config.get("quantization_sweep") or []):
        settled = settle({**base, **entry}, f"quantization_sweep[{i}]")
        settled.pop("quant_storage", None)  # measured, never trained with FSDP
        name = label(settled)
        if name in points:
            raise InputError(f"config key 'quantization_sweep[{i}]': found {entry}, the same "
                             f"method as an earlier entry ({name}); expected each once")
        points[name] = settled
    return points
