"""Stage of rules/analyze.smk: the spectrum of one trained adapter, layer by layer, with a rank
recommendation."""

from __future__ import annotations

import logging

from ..analysis.analyze_job import analyze_into
from ..models import tokenizer_files
from ..outputs import stage_outputs, write_json
from ..policy import Policy

log = logging.getLogger(__name__)


def analyze_adapter(*, adapter, base, analysis, settings: dict, task: str, kind: str,
                    policy: Policy) -> dict:
    """One folder: layers.json (every adapted layer's singular values and metrics),
    summary.json (by module type and depth, the rank recommendation) and analysis.md. The
    base is read one layer at a time (analysis/adapter.py)."""
    return analyze_into("analyze_adapter", adapter=adapter, base=base, analysis=analysis,
                        settings=settings, task=task, kind=kind, policy=policy)


def compress_adapter(*, adapter, compressed, settings: dict, task: str,
                     policy: Policy) -> dict:
    """The task's QLoRA adapter cut to lower ranks (analysis/compress.py), a PEFT adapter
    scored as the `compressed` variant on the quantized base it was trained on; beside it,
    compression.json: parameters and bytes before and after, the energy kept per layer."""
    from ..analysis import compress

    with stage_outputs("compress_adapter", {"compressed": compressed}, config=settings,
                       inputs={"adapter": adapter}, policy=policy) as out:
        result = compress.compress(adapter, out["compressed"], settings)
        tokenizer_files.copy(adapter, out["compressed"])  # the source adapter's
        write_json(out["compressed"] / "compression.json", {"task": task, **result})
    log.info("%s: %d layers, rank %d -> %s, parameters %d -> %d, energy kept >= %.3f", task,
             result["layers"], result["rank_before"], result["rank_after"],
             result["parameters"]["before"], result["parameters"]["after"],
             result["energy_kept"]["min"])
    return result
