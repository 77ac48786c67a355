"""Each exported GGUF file (export.json, stages/export.py): its size, time, and both round
trips (the importer's tensors, llama.cpp's answers, tokens and top tokens)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    rows = []
    for directory in map(Path, files):
        export = read_json(directory / "export.json")
        for gguf_type, found in export["types"].items():
            imported, run = found["importer"], found["llama_cpp"]
            rows.append({
                "task": export["task"], "type": gguf_type, "MiB": found["bytes"] / 2 ** 20,
                "bits_per_param": found["bits_per_param"], "seconds": found["seconds"],
                "importer_weight_error": imported.get("max_weight_rel_error"),
                "llama_cpp_same_answer": run.get("same_answer"),
                "llama_cpp_same_tokens": run.get("same_tokens"),
                "llama_cpp_same_top_token": run.get("same_top_token")})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return "\n".join(["## GGUF exports", "",
                      "Each exporting task's merged model as GGUF (task key `export`; "
                      "results/models/gguf/): its size, the largest relative tensor error when "
                      "read back by the importer, and on the task's test prompts in llama.cpp the "
                      "share of the merged model's greedy answers, prompt tokens and top next "
                      "tokens it reproduces (docs/serving.md).", "",
                      frame.to_markdown(index=False, floatfmt=".4g"), ""])
