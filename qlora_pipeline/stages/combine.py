"""Stage of rules/combine.smk: several tasks' QLoRA adapters combined into one PEFT adapter
(analysis/combine.py), scored by the evaluate rule as the variant combined+<name>."""

from __future__ import annotations

import logging

from ..core.files import write_json
from ..core.layout import COMBINED_FROM
from ..core.policy import Policy
from ..models import tokenizer_files
from . import Inputs, Output

log = logging.getLogger(__name__)


def combine_adapters(*, adapters: Inputs, combined: Output, combination: dict, seed: int,
                     policy: Policy) -> dict:
    """One folder: adapter_config.json and adapter_model.safetensors (loadable with
    PeftModel.from_pretrained on the quantized base), and combination.json: the settings, each
    layer's rank and error against the method's definition, the tasks' subspace overlaps.
    A task with recovery on takes part with its QLoRA adapter, the one trained on the quantized
    base that every source shares (its recovered adapter belongs to the full-precision base)."""
    from ..analysis.combine import combine

    sources = dict(zip(combination["tasks"], map(str, adapters)))
    result = combine(sources, combined, combination, seed, device=policy.device)
    tokenizer_files.copy(adapters[0], combined)  # every source's is the base's
    write_json(combined / "combination.json",
               {"sources": {task: {"adapter": path, "kind": COMBINED_FROM}
                            for task, path in sources.items()}, **result})
    log.info("%s (%s of %s): %d layers, rank %d..%d, error against its definition <= %.2g, "
             "from the weighted sum <= %.2g", combination["name"], combination["method"],
             ", ".join(sources), result["layers"], result["rank"]["min"], result["rank"]["max"],
             result["relative_error"]["max"], result["from_sum"]["max"])
    return result
