"""Shared fixtures: a tiny tokenizer and a tiny randomly initialised Llama model, built
offline in seconds, for tests where behaviour (not quality) is under test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Tests import these from conftest; the benchmarks' smoke versions share them.
from benchmarks.tiny_models import CHAT_TEMPLATE, build_model, build_tokenizer, save_model

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """An HF safetensors checkpoint + tokenizer of a 2-layer random Llama."""
    return save_model(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer)


def task_blocks() -> dict:
    """Complete lora/train/recovery/merge blocks: a minimal task with the schema defaults."""
    from qlora_pipeline.config.schema import load_schema, validate

    task = {"format": "chat",
            "dataset": {"source": "builtin", "name": "arithmetic", "num_examples": 80}}
    return validate(task, load_schema("task.schema.yaml"), "test")


def build_inputs(root: Path, model_dir: Path) -> tuple[Path, Path]:
    """A saved quantized base and tokenized arithmetic (chat) data, built with the stages."""
    stage("quantize")(base=model_dir, quantized=root / "quantized", seed=0,
                      quantization={"method": "nf4", "double_quant": True,
                                    "compute_dtype": "auto", "skip_modules": ["lm_head"]})
    stage("fetch_dataset")(raw=root / "raw", format="chat",
                           dataset={"source": "builtin", "name": "arithmetic",
                                    "num_examples": 80, "seed": 1, "validation_fraction": 0.1,
                                    "test_fraction": 0.1, "columns": {}})
    stage("tokenize")(raw=root / "raw", base=model_dir, tokenized=root / "tokenized",
                      format="chat",
                      tokenize={"max_length": 128, "train_on_prompt": False, "packing": False})
    return root / "quantized", root / "tokenized"


def pruned_adalora(model):
    """An AdaLoRA model as if pruned: random E, a random rank pattern (1-4 kept triplets per
    layer, PEFT's masks), pruned E_i zero as PEFT masks them. Saved, the layers keep only their
    kept triplets while ranknum stays init_r: the scaling the merge must use."""
    import torch

    generator = torch.Generator().manual_seed(1)
    pattern = {}
    for name, param in model.base_model.model.named_parameters():
        if ".lora_E." in name:
            kept = torch.rand(param.shape[0], generator=generator) < 0.5
            kept[int(torch.randint(param.shape[0], (1,), generator=generator))] = True
            pattern[name] = kept.tolist()
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * kept[:, None])
    model.peft_config["default"].rank_pattern = pattern
    return model


def job_policy():
    """The policy a job on this machine gets (tests call stages without a job around them)."""
    from qlora_pipeline.core.policy import Policy

    return Policy.detect()


def stage(rule: str):
    """The stage of `rule` called by its rule's names, as its job runs it (outputs complete or
    absent, with provenance), with this machine's policy unless one is given."""
    from benchmarks.support import run_stage

    def call(**kwargs):
        return run_stage(rule, **{"policy": job_policy(), **kwargs})

    return call


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, tasks=("arithmetic", "topic")) -> dict:
    """A run configuration for the tiny model; tests adjust it before writing it."""
    return {
        "tasks": list(tasks),
        "base_model": {"source": "local", "path": str(model_dir)},
        "quantization": {"method": "nf4", "double_quant": True},
        "quantization_report": {"max_examples": 8},
        "evaluation": {"limit": 8, "max_gen_tokens": 4},
        # Both tasks' adapters in one, scored on each beside the other task's (test_combine.py).
        "combinations": [{"name": "both", "tasks": list(tasks), "method": "sum"}]
        if len(tasks) > 1 else [],
        "defaults": {
            "tokenize": {"max_length": 128},
            "train": {"max_steps": 6, "eval_steps": 3, "batch_size": 4, "logging_steps": 1,
                      "learning_rate": 0.005},
            "merge": {"check_examples": 2},
        },
    }


# One task of each kind; arithmetic also exercises recovery.
TINY_TASKS = {
    "arithmetic": {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                                 "num_examples": 60, "seed": 1},
                   "recovery": {"enabled": True, "steps": 2}},
    "topic": {"format": "completion", "dataset": {"source": "builtin", "name": "topic",
                                                  "num_examples": 60, "seed": 2},
              "compress": {"rank": 1}, "sweep": {"lora.r": [1, 2]}},
}


def make_workdir(path: Path, model_dir: Path) -> Path:
    write_yaml(path / "config" / "config.yaml", tiny_config(model_dir))
    for name, task in TINY_TASKS.items():
        write_yaml(path / "config" / "tasks" / f"{name}.yaml", task)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """The whole pipeline, once per test session, on the tiny model. Tests only read it;
    a test that edits config or outputs works on a copy (`copy_run`)."""
    workdir = make_workdir(tmp_path_factory.mktemp("tiny-run"), tiny_model_dir)
    snakemake(workdir)
    return workdir


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A private copy of the finished tiny run (outputs, mtimes and Snakemake metadata)."""
    def copy(name: str = "run") -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_run, target, symlinks=True)
        return target
    return copy


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Path:
    """A Snakemake working directory holding a tiny-model config and two small tasks."""
    return make_workdir(tmp_path, tiny_model_dir)


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None,
              repo: Path = REPO, slots: int = 1) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in `workdir` (no profile, so tests set every flag).
    `env`: variables added to this process's environment; `repo`: another copy of the
    workflow and its library; `slots`: --resources gpu=N, model jobs side by side."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config/config.yaml"),
           "--cores", "2", "--resources", f"gpu={slots}", "--workflow-profile", "none", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}"
                             f"\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def run_snakemake():
    return snakemake


@pytest.fixture
def small_disk(tmp_path):
    """A 100 KiB tmpfs the test mounts (root here and in CI, where it must not skip): smaller
    than the tiny model's quantized checkpoint (~180 KB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        why = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if os.environ.get("CI") == "true" or os.environ.get("QLORA_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
