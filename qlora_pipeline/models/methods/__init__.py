"""Quantization methods, one module each (bnb4: bitsandbytes NF4/FP4; bnb8: LLM.int8; hqq: HQQ
1-8 bits), behind one interface, so that settling the config, quantizing, saving, loading,
dequantizing, counting stored bits and checking the math are the same calls whatever the
method. A method module declares everything about it, and nothing else lists methods:

    NAMES, KEYS                               its quantization.method names; its own config
                                              keys with their defaults (config/quantization.py)
    label(cfg), describe(cfg), THEORY         its name in a sweep, in reports, its bits in words
    layer_class()                             the class of its quantized linear layers (None
                                              where its library is not installed)
    WROTE                                     what config.json's quantization_config holds
                                              when it wrote the checkpoint
    quantize(base_dir, cfg, policy) -> model  the base quantized in memory
    save(model, out_dir)                      its checkpoint (config.json names the method)
    load(path, policy) -> model               that checkpoint, loaded as stored
    compute_dtype(model)                      the dtype its layers take and give
    dequantized(module) -> Tensor             deq(Q(W)) of one layer
    quantize_tensor(weight, cfg, policy)      deq(Q(W)) of one full-precision 2-D weight, as
                                              `quantize` computes it (LoftQ's Q, training/init)
    stored_bytes(module)                      what one layer stores (every constant)
    theoretical_bits(cfg, in_features=, meta_bits=)   the formula of docs/quantization.md (with
                                              its defaults: the bits a memory estimate counts)
    stored_weight(key, get, weight_map)       deq(Q(W)) read from a checkpoint's tensors, or None
    is_stored_part(key, weight_map), weight_key(key)   its stored tensors vs the model's keys
    TOLERANCE                                 numerics.check's bound for the layer's math
Each imports torch and its library only inside its functions: the config reads them when the
workflow is parsed. What several methods share (save, load, weight_key for the
checkpoints transformers saves itself) is defined once in common.py and re-exported.
"""

from __future__ import annotations

from ...core.files import read_json
from . import bnb4, bnb8, hqq

ALL = (bnb4, bnb8, hqq)
MODULES = {name: module for module in ALL for name in module.NAMES}


def of(method: str):
    return MODULES[method]


def of_checkpoint(path) -> object:
    """The method a saved quantized checkpoint was written by (its config.json)."""
    stored = read_json(f"{path}/config.json").get("quantization_config") or {}
    for module in ALL:
        if stored.items() >= module.WROTE.items():  # every key of WROTE, with its value
            return module
    raise ValueError(f"{path}/config.json: no quantization_config of a known method "
                     f"(bitsandbytes 4-bit or 8-bit, hqq); expected a quantize stage's output")


def layers_types() -> tuple[type, ...]:
    """The classes of quantized linear layers, every method's."""
    return tuple(filter(None, (m.layer_class() for m in ALL)))


def layers(model) -> list[tuple[str, object]]:
    """(name, module) of every quantized linear layer, whatever its method."""
    kinds = layers_types()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def of_layer(module):
    return next(m for m in ALL if isinstance(module, m.layer_class() or ()))  # () matches none


def stored_weight(key: str, get, weight_map: dict):
    """deq(Q(W)) of `key` (`<layer>.weight`) from a checkpoint's tensors, or None when the
    checkpoint stores it unquantized."""
    values = (module.stored_weight(key, get, weight_map) for module in ALL)
    return next((value for value in values if value is not None), None)


def logical_keys(keys: list[str], weight_map: dict) -> list[str]:
    """The model's own keys in a quantized checkpoint, in order: each method's stored parts
    replaced by the `<layer>.weight` they encode."""
    out = []
    for key in keys:
        renamed = next(filter(None, (module.weight_key(key) for module in ALL)), None)
        # A tensor a method stores beside (or instead of) a layer's weight is not a model key.
        if renamed or not any(m.is_stored_part(key, weight_map) for m in ALL):
            out.append(renamed or key)
    return out
