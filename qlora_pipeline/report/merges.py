"""Each task's merge check (merge_check.json): the merged model's largest logit gap to the same
base and adapter unmerged, and to the model as trained, for each merge base compared."""

from __future__ import annotations

import pandas as pd

from .common import each_json, paragraphs


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"task": folder.name, "merge_base": base,
                          "chosen": base == check["chosen"], "recovered": check.get("recovered"),
                          "max_gap_vs_unmerged": gaps["vs_unmerged"]["max_abs_logit_gap"],
                          "max_gap_vs_trained": gaps["vs_trained"]["max_abs_logit_gap"],
                          "top1_agreement_vs_trained": gaps["vs_trained"]["top1_agreement"]}
                         for folder, check in each_json(files, "merge_check.json")
                         for base, gaps in check["checks"].items()])


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return paragraphs("## Merge checks", frame.to_markdown(index=False, floatfmt=".3g"))
