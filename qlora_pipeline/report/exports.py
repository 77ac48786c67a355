"""Each exported GGUF file (export.json, stages/export.py): its size, time, and both round
trips (the importer's tensors, llama.cpp's answers, tokens and top tokens)."""

from __future__ import annotations

import pandas as pd

from .common import each_json, paragraphs

LLAMA_CPP = ("same_answer", "same_tokens", "same_top_token")  # llama.cpp's round trip's shares


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    return pd.DataFrame([{
        "task": export["task"], "type": gguf_type, "MiB": found["bytes"] / 2 ** 20,
        "bits_per_param": found["bits_per_param"], "seconds": found["seconds"],
        "importer_weight_error": found["importer"].get("max_weight_rel_error"),
        **{f"llama_cpp_{key}": found["llama_cpp"].get(key) for key in LLAMA_CPP}}
        for _, export in each_json(files, "export.json")
        for gguf_type, found in export["types"].items()])


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return paragraphs("## GGUF exports",
                      "Each exporting task's merged model as GGUF (task key `export`; "
                      "results/models/gguf/): its size, the largest relative tensor error when "
                      "read back by the importer, and on the task's test prompts in llama.cpp the "
                      "share of the merged model's greedy answers, prompt tokens and top next "
                      "tokens it reproduces (docs/serving.md).",
                      frame.to_markdown(index=False, floatfmt=".4g"))
