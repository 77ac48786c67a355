"""`make setup` checks what the machine must have before any install (envs/prerequisites.sh):
with the compiler hidden, an old Python or one without venv, it stops within seconds naming
each missing piece and the command that installs it, and creates nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPILER = re.compile(r"^(cc|c\+\+|gcc|g\+\+|clang|clang\+\+)(-[0-9.]+)?$|-(gcc|g\+\+)(-[0-9.]+)?$")


@pytest.fixture
def no_compiler(tmp_path) -> dict:
    """An environment whose PATH has every tool of this machine but the C/C++ compilers, and an
    empty wheel cache (so llama.cpp would have to be built)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir() if Path(folder).is_dir() else ():
            link = bin_dir / tool.name
            if not COMPILER.search(tool.name) and not os.path.lexists(link):
                link.symlink_to(tool)
    python = bin_dir / "python3"  # the interpreter running the tests: >= 3.11, with venv
    python.unlink(missing_ok=True)
    python.symlink_to(sys.executable)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def make_setup(env: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    assert make, "make not found: the README's set-up (make setup) needs it"
    return subprocess.run([make, "--no-print-directory", "setup", f"VENV={tmp_path / 'venv'}",
                           *args], cwd=REPO, env={**env, "LANG": "C"}, capture_output=True,
                          text=True, timeout=60, check=False)


def test_setup_without_a_compiler_stops_at_once_naming_it(no_compiler, tmp_path):
    started = time.monotonic()
    result = make_setup(no_compiler, tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - started < 20  # no pip install ran
    assert "setup: missing: a C compiler" in result.stderr
    assert "setup: missing: a C++ compiler" in result.stderr
    assert "install: apt-get install build-essential" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_cached_llama_cpp_wheel_needs_no_compiler(no_compiler, tmp_path):
    wheels = subprocess.run(["bash", str(REPO / "envs/install-llama-cpp.sh"), "--needs-build"],
                            env=no_compiler, capture_output=True, text=True, check=True)
    folder = Path(wheels.stdout.strip())  # exit 0: no wheel yet, a build is needed
    folder.mkdir(parents=True)
    (folder / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").touch()
    result = subprocess.run(["bash", str(REPO / "envs/prerequisites.sh")], env=no_compiler,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def fake_python(tmp_path: Path, version: str, venv: bool) -> Path:
    """An interpreter that reports `version` and, without venv, fails to import it (it answers
    the three questions envs/prerequisites.sh asks)."""
    script = tmp_path / "fakepython"
    script.write_text(f"""#!/bin/bash
case "$*" in
    *"version_info < (3, 11)"*) exit {int(version < "3.11")};;
    *"import venv"*) exit {0 if venv else 1};;
    *) echo {version};;
esac
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("version", "venv", "expected"), [
    ("3.10", True, "Python >= 3.11 ('{python}' is 3.10)"),
    ("3.11", False, "the venv module of '{python}' (3.11; Debian splits it off)"),
])
def test_an_old_python_or_one_without_venv_is_named(no_compiler, tmp_path, version, venv,
                                                    expected):
    python = fake_python(tmp_path, version, venv)
    result = make_setup(no_compiler, tmp_path, f"PYTHON={python}")
    assert result.returncode != 0
    assert f"setup: missing: {expected.format(python=python)}" in result.stderr
    assert ("make PYTHON=" in result.stderr) if version == "3.10" else \
        "apt-get install python3.11-venv" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_missing_python_is_named(no_compiler, tmp_path):
    result = make_setup(no_compiler, tmp_path, "PYTHON=python3.99")
    assert result.returncode != 0
    assert "setup: missing: Python >= 3.11 ('python3.99' not found)" in result.stderr


def test_the_real_machine_has_what_setup_needs():
    """This machine (and CI's) passes the check that make setup runs first."""
    result = subprocess.run(["bash", str(REPO / "envs/prerequisites.sh")],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
