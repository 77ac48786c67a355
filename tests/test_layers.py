"""Layers that point one way, checked with import-linter (the contracts in pyproject.toml):
every subpackage sits in a layer, a module imports only from the layers below its own and
never from a sibling of its layer, and no module imports itself through others. Imports
inside functions count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=package_parent,
                          env={**os.environ, "PYTHONPATH": str(package_parent)})


def test_the_contracts_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_import_up_a_layer_or_a_cycle_is_found(tmp_path):
    """The check can fail: a model module importing a stage (up), and two core modules
    importing each other (a cycle, through a function-level import)."""
    shutil.copytree(REPO / "qlora_pipeline", tmp_path / "qlora_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    checkpoint = tmp_path / "qlora_pipeline/models/checkpoint.py"
    checkpoint.write_text(checkpoint.read_text() + "\n\ndef _up():\n"
                          "    from ..stages import train  # noqa: F401\n")
    files = tmp_path / "qlora_pipeline/core/files.py"
    files.write_text(files.read_text() + "\n\ndef _cycle():\n"
                     "    from . import layout  # noqa: F401\n")
    layout = tmp_path / "qlora_pipeline/core/layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _back():\n"
                       "    from . import files  # noqa: F401\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "qlora_pipeline.models is not allowed to import qlora_pipeline.stages" in result.stdout
    assert "No import cycles BROKEN" in result.stdout
