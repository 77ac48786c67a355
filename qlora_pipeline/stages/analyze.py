"""Stages of rules/analyze.smk: the spectrum of one trained adapter (any training of the
trainings table), layer by layer, with a rank recommendation; and a task's adapter cut to
lower ranks."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..core.files import write_json
from ..core.policy import Policy
from ..models import tokenizer_files
from . import Input, Output

log = logging.getLogger(__name__)


def analyze_adapter(*, adapter: Input, base: Input, analysis: Output, settings: dict, task: str,
                    name: str, policy: Policy) -> dict:
    """One folder: layers.json (every adapted layer's singular values and metrics),
    summary.json (by module type and depth, the rank recommendation) and analysis.md; for an
    adapter with a weight-derived init, the learned update's too (layers_learned.json,
    summary.json's "learned"). The
    base is read one layer at a time (analysis/adapter.py). `name`: the adapter's
    (layout.adapter_name: qlora, recovered, qlora@<training>, ...)."""
    from ..analysis import adapter as adapter_analysis
    from ..analysis import tables

    result = adapter_analysis.analyze(adapter, base, settings, policy.device)
    write_json(analysis / "layers.json", result.pop("layers"))
    text = tables.markdown(task, name, result)
    # A LoftQ/PiSSA adapter started at B₀A₀ ≠ 0, part of the base (training/init.py): its
    # whole update s·BA is analysed above, what training learned, s·(BA − B₀A₀), beside it
    # (its conversion to plain LoRA, rank 2r).
    if (learned := Path(adapter) / "converted").is_dir():
        result = {**result, "update": "whole: s·BA, the initial adapter's part included",
                  "learned": adapter_analysis.analyze(learned, base, settings, policy.device)}
        write_json(analysis / "layers_learned.json", result["learned"].pop("layers"))
        text += "\n" + tables.markdown(task, f"{name} (learned: final − initial)",
                                       result["learned"])
    write_json(analysis / "summary.json", {"task": task, "kind": name, **result})
    (analysis / "analysis.md").write_text(text, encoding="utf-8")
    log.info("\n%s", text)
    return result


def compress_adapter(*, adapter: Input, compressed: Output, settings: dict, task: str,
                     policy: Policy) -> dict:
    """The task's QLoRA adapter cut to lower ranks (analysis/compress.py), a PEFT adapter
    scored as the `compressed` variant on the quantized base it was trained on; beside it,
    compression.json: parameters and bytes before and after, the energy kept per layer (and,
    for a LoftQ/PiSSA adapter, the same of its learned update under "learned")."""
    from ..analysis import compress

    result = compress.compress(adapter, compressed, settings)
    tokenizer_files.copy(adapter, compressed)  # the source adapter's
    # A LoftQ/PiSSA adapter: the whole one is cut (it is what is scored on its own base); the
    # learned update s·(BA − B₀A₀), its converted/ adapter, cut alike and reported beside it.
    if (learned := Path(adapter) / "converted").is_dir():
        with tempfile.TemporaryDirectory() as scratch:
            cut = compress.compress(learned, Path(scratch), settings)
        result = {**result, "update": "whole: s·BA, the initial adapter's part included",
                  "learned": {k: v for k, v in cut.items() if k != "per_layer"}}
    write_json(compressed / "compression.json", {"task": task, **result})
    log.info("%s: %d layers, rank %d -> %s, parameters %d -> %d, energy kept >= %.3f", task,
             result["layers"], result["rank_before"], result["rank_after"],
             result["parameters"]["before"], result["parameters"]["after"],
             result["energy_kept"]["min"])
    return result
