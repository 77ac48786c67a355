"""provenance.json: what produced an output directory, enough to reproduce or audit it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from ..core import machine
from ..core.files import checksum, config_hash
from . import code_digest

PACKAGES = [
    "torch", "transformers", "bitsandbytes", "peft", "datasets", "tokenizers",
    "accelerate", "safetensors", "gguf", "lm_eval", "snakemake",
]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, no repository, or no answer
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build(job, policy, started: str) -> dict:
    """The one provenance shape (written by outputs.stage_outputs for every job): the rule's
    own inputs (with checksums), params and wildcards, as the job was given them."""
    # Checksumming is cheap next to the work each stage does, and makes "same inputs" provable.
    return {
        "stage": job.rule,
        "params": job.params,
        "params_hash": config_hash(job.params),
        "wildcards": job.wildcards,
        "inputs": {name: input_record(paths) for name, paths in job.inputs.items()},
        "code": code_digest.for_rule(job.rule),  # equals the rule's params.code
        "packages": package_versions(),
        "device": policy.device_name,
        "policy": policy.as_dict(),
        "machine": machine.facts(),  # CPU model and numerics flags, torch threads, bnb library
        "seed": job.params.get("seed"),
        "git_commit": git_commit(Path(__file__).parent),  # of the code that ran
        "started": started,
        "finished": now(),
    }


def input_record(paths) -> dict | list[dict]:
    """{"path", "sha256"} of an input, or of each input of a list."""
    if isinstance(paths, (list, tuple)):
        return [input_record(p) for p in paths]
    return {"path": str(paths), "sha256": checksum(paths)}
