"""provenance.json: what produced an output directory, enough to reproduce or audit it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import code_digest, machine

PACKAGES = [
    "torch", "transformers", "bitsandbytes", "peft", "datasets", "tokenizers",
    "accelerate", "safetensors", "gguf", "lm_eval", "snakemake",
]


def config_hash(config_slice: Any) -> str:
    canonical = json.dumps(config_slice, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checksum(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build(*, stage: str, config_slice: Any, inputs: dict[str, str], policy, seed: int | None,
          started: str) -> dict:
    """The one provenance shape (written by outputs.stage_outputs for every stage)."""
    # Checksumming is cheap next to the work each stage does, and makes "same inputs" provable.
    return {
        "stage": stage,
        "config": config_slice,
        "config_hash": config_hash(config_slice),
        "inputs": {name: {"path": str(p), "sha256": checksum(p)} for name, p in inputs.items()},
        "code": code_digest.for_rule(stage),  # equals the rule's params.code
        "packages": package_versions(),
        "device": policy.device_name,
        "policy": policy.as_dict(),
        "machine": machine.facts(),  # CPU model and numerics flags, torch threads, bnb library
        "seed": seed,
        "git_commit": git_commit(Path(__file__).parent),  # of the code that ran
        "started": started,
        "finished": now(),
    }
