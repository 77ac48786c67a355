"""The quantization settings of a run, settled at parse time (torch-free): each method's own
keys with their defaults, the others refused, and the sweep's points named.

Only the keys a method reads reach the quantize rule's params, so that editing, say,
`group_size` while the method is nf4 reruns nothing.
"""

from __future__ import annotations

from .errors import InputError

# The keys each method reads beyond compute_dtype and skip_modules, with their defaults.
METHOD_KEYS = {"nf4": {"double_quant": True, "quant_storage": "auto"},
               "fp4": {"double_quant": True, "quant_storage": "auto"},
               "int8": {},
               "hqq": {"bits": 4, "group_size": 64}}
OWN_KEYS = {"double_quant", "bits", "group_size", "quant_storage"}


def settle(settings: dict, where: str, fsdp: bool = False) -> dict:
    """`settings` (schema-validated) with the method's defaults; a key of another method is
    refused, naming it. `fsdp`: a task trains with FSDP, which shards only float tensors."""
    method = settings["method"]
    keys = METHOD_KEYS[method]
    for key in sorted(OWN_KEYS & set(settings) - set(keys)):
        if key == "quant_storage" and settings[key] == "auto":  # the schema's default
            continue
        users = [m for m, own in METHOD_KEYS.items() if key in own]
        raise InputError(f"config key '{where}.{key}': found it with method '{method}'; it "
                         f"applies to method {' or '.join(users)} only, expected it left out")
    settled = {k: v for k, v in settings.items() if k not in OWN_KEYS or k in keys}
    settled = {**keys, **settled}
    if "quant_storage" in keys and settled["quant_storage"] == "auto":
        settled["quant_storage"] = "compute" if fsdp else "uint8"
    elif fsdp and "quant_storage" not in keys:
        raise InputError(f"config key '{where}.method': found '{method}' with a task trained "
                         f"with train.distributed.strategy fsdp; expected nf4 or fp4 (FSDP "
                         f"shards the 4-bit weights stored as floats), or strategy ddp")
    return settled


def label(settings: dict) -> str:
    """A sweep point's name: nf4, nf4-nodq, int8, hqq3-g64."""
    method = settings["method"]
    if method == "hqq":
        return f"hqq{settings['bits']}-g{settings['group_size']}"
    if method in ("nf4", "fp4") and not settings["double_quant"]:
        return f"{method}-nodq"
    return method


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
