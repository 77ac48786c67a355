"""The files that make a folder self-describing for generation: the tokenizer (with its chat
template, EOS and pad tokens) and generation_config.json. Copied from the base into every
model and adapter folder the pipeline writes, so that a merged model or an adapter chats,
stops and pads as the base does wherever it is loaded (transformers, vLLM, llama.cpp's
converter) without the base's folder beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

PREFIXES = ("tokenizer", "special_tokens", "chat_template", "generation_config")


def copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src`'s tokenizer and generation files into `dst`."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name.startswith(PREFIXES):
            shutil.copy2(path, Path(dst) / path.name)
