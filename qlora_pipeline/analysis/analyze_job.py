"""One adapter's analysis written as a stage's output (layers.json, summary.json,
analysis.md): what analyze_adapter and a sweep point's analysis share (stages/analyze.py,
stages/sweep.py), kept outside the stage modules so that each rule's code digest reaches only
what it runs."""

from __future__ import annotations

import logging

from ..outputs import stage_outputs, write_json
from ..policy import Policy

log = logging.getLogger(__name__)


def analyze_into(stage: str, *, adapter, base, analysis, settings: dict, task: str, kind: str,
            policy: Policy) -> dict:
    """What `analyze_adapter` does, for any stage that analyses an adapter."""
    from . import adapter as adapter_analysis
    from . import tables

    with stage_outputs(stage, {"analysis": analysis}, config=settings,
                       inputs={"adapter": adapter, "base": base}, policy=policy) as out:
        result = adapter_analysis.analyze(adapter, base, settings, policy.device)
        write_json(out["analysis"] / "layers.json", result.pop("layers"))
        write_json(out["analysis"] / "summary.json", {"task": task, "kind": kind, **result})
        text = tables.markdown(task, kind, result)
        (out["analysis"] / "analysis.md").write_text(text, encoding="utf-8")
    log.info("\n%s", text)
    return result
