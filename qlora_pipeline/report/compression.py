"""Each compressed adapter (compression.json) against the adapter it was cut from: ranks,
energy kept, size, and the two adapters' scores on the task's own benchmark."""

from __future__ import annotations

import pandas as pd

from ..core.layout import COMPRESSED_FROM
from .common import each_json, paragraphs


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    """`frames["scores"]`: the scores section's rows."""
    scores, rows = frames["scores"], []
    for _, info in each_json(files, "compression.json"):
        task, after = info["task"], info["rank_after"]
        own = scores[(scores["task"] == task) & (scores["benchmark"] == task)]
        rows.append({"task": task, "keep": ", ".join(f"{k} {v}" for k, v in info["keep"].items()),
                     "rank": f"{info['rank_before']} -> {after['min']}..{after['max']} "
                             f"(mean {after['mean']:.2f})",
                     "energy_kept_min": info["energy_kept"]["min"],
                     "parameters": f"{info['parameters']['before']:,} -> "
                                   f"{info['parameters']['after']:,}",
                     "bytes": f"{info['bytes']['before']:,} -> {info['bytes']['after']:,}",
                     "size_ratio": info["parameters"]["ratio"],
                     **{f"score_{variant}": next(map(float, own.loc[own["variant"] == variant,
                                                                    "value"]), None)
                        for variant in (COMPRESSED_FROM, "compressed")}})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return paragraphs("## Compression",
                      f"Each {COMPRESSED_FROM} adapter cut to lower ranks (task key `compress`), "
                      "scored as the `compressed` variant on the same quantized base; scores are "
                      "the task's own metric.", frame.to_markdown(index=False, floatfmt=".4g"))
