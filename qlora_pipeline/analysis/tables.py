"""An adapter analysis as markdown: where the update is (depth, module type), how many
directions it uses, and the rank to train with next time."""

from __future__ import annotations

COLUMNS = (("layers", "layers", "{:d}"), ("fro", "‖ΔW‖_F", "{:.4f}"),
           ("relative_norm", "‖ΔW‖_F/‖W0‖_F", "{:.4f}"),
           ("effective_rank", "effective rank", "{:.2f}"), ("stable_rank", "stable rank", "{:.2f}"),
           ("rank_90", "rank for 90 %", "{:.1f}"), ("intruders", "intruders", "{:.2f}"))


def stats_table(title: str, groups: dict[str, dict]) -> list[str]:
    shown = [c for c in COLUMNS if any(g.get(c[0]) is not None for g in groups.values())]
    lines = [f"| {title} | " + " | ".join(c[1] for c in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for name, stats in groups.items():
        cells = ["" if stats.get(key) is None else fmt.format(stats[key]) for key, _, fmt in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(task: str, kind: str, result: dict) -> str:
    summary, rec = result["summary"], result["recommendation"]
    warning = [f"> **Warning:** {rec['warning']}", ""] if rec["warning"] else []
    lines = [f"### {task}: {kind} adapter", "",
             f"r = {result['r']}, {result['layers_analyzed']} adapted layers (means per group; "
             f"effective rank = exp(entropy of the singular values); stable rank = "
             f"‖ΔW‖_F²/‖ΔW‖₂²).", "",
             *stats_table("depth", summary["by_depth"]), "",
             *stats_table("module", summary["by_module"]), "",
             f"**Rank recommendation** (keeps {100 * rec['energy']:.0f} % of ‖ΔW‖_F² in every "
             f"layer): uniform r = {rec['uniform']}; per-layer ranks "
             + ", ".join(f"{rank}: {count} layers" for rank, count in rec["histogram"].items())
             + ".", "", *warning, "```yaml", rec["snippet"].rstrip(), "```", ""]
    return "\n".join(lines)
