"""Stage of rules/combine.smk: several tasks' QLoRA adapters combined into one PEFT adapter
(analysis/combine.py), scored by the evaluate rule as the variant combined+<name>."""

from __future__ import annotations

import logging

from ..combinations import KIND
from ..models import tokenizer_files
from ..outputs import stage_outputs, write_json
from ..policy import Policy

log = logging.getLogger(__name__)


def combine_adapters(*, adapters: list, combined, combination: dict, seed: int,
                     policy: Policy) -> dict:
    """One folder: adapter_config.json and adapter_model.safetensors (loadable with
    PeftModel.from_pretrained on the quantized base), and combination.json: the settings, each
    layer's rank and error against the method's definition, the tasks' subspace overlaps.
    A task with recovery on takes part with its QLoRA adapter, the one trained on the quantized
    base that every source shares (its recovered adapter belongs to the full-precision base)."""
    from ..analysis.combine import combine

    sources = dict(zip(combination["tasks"], map(str, adapters)))
    with stage_outputs("combine_adapters", {"combined": combined},
                       config={**combination, "kind": KIND},
                       inputs={f"adapter_{task}": path for task, path in sources.items()},
                       policy=policy, seed=seed) as out:
        result = combine(sources, out["combined"], combination, seed, device=policy.device)
        tokenizer_files.copy(adapters[0], out["combined"])  # every source's is the base's
        write_json(out["combined"] / "combination.json",
                   {"sources": {task: {"adapter": path, "kind": KIND}
                                for task, path in sources.items()}, **result})
    log.info("%s (%s of %s): %d layers, rank %d..%d, error against its definition <= %.2g, "
             "from the weighted sum <= %.2g", combination["name"], combination["method"],
             ", ".join(sources), result["layers"], result["rank"]["min"], result["rank"]["max"],
             result["relative_error"]["max"], result["from_sum"]["max"])
    return result
