"""Disk space (core/disk.py): a stage refuses before loading where its outputs cannot fit, and
a full disk met while writing is one line naming the output, with nothing left behind. On a
real small filesystem: a tmpfs the test mounts (root here and in CI, where it must not skip)."""

from __future__ import annotations

import errno
import gc
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, stage

from qlora_pipeline.core import disk
from qlora_pipeline.core.errors import DiskFull
from qlora_pipeline.core.memory import Shapes

NF4 = {"method": "nf4", "double_quant": True, "compute_dtype": "auto",
       "skip_modules": ["lm_head"]}


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_stage_that_cannot_fit_is_refused_then_fails_cleanly(small_disk, tiny_model_dir,
                                                              monkeypatch):
    from qlora_pipeline.models import quantization

    out = small_disk / "models" / "quantized"
    loaded = quantization.quantize
    monkeypatch.setattr(quantization, "quantize", lambda *a: pytest.fail("loaded"))
    with pytest.raises(DiskFull) as refused:  # (a) the estimate, before anything loads
        stage("quantize")(base=tiny_model_dir, quantized=out, seed=0, quantization=NF4)
    needed = disk.quantized_model_bytes(Shapes.from_checkpoint(tiny_model_dir), 4.127)
    assert re.fullmatch(rf"quantize: needs {needed / 2**20:.1f} MiB \({needed} bytes\) in "
                        rf"{re.escape(str(out.parent))}, 0\.1 MiB \(\d+ bytes\) free; .*"
                        rf"QLORA_SKIP_DISK_CHECK=1 runs it anyway\)", one_line(refused))
    assert os.listdir(small_disk) == []

    monkeypatch.setattr(quantization, "quantize", loaded)
    monkeypatch.setenv(disk.SKIP_ENV, "1")
    with pytest.raises(DiskFull) as full:  # (b) checked no more: the disk fills while it saves
        stage("quantize")(base=tiny_model_dir, quantized=out, seed=0, quantization=NF4)
    assert re.fullmatch(rf"quantize: no space left on device writing "
                        rf"{re.escape(str(out))}( \(at \S+\))?; 0\.1 MiB \(\d+ bytes\) free in "
                        rf"{re.escape(str(small_disk))}; nothing was kept; .*",
                        one_line(full))
    assert os.listdir(small_disk) == []  # no temporary folder, no partial output

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    stage("quantize")(base=tiny_model_dir, quantized=out, seed=0, quantization=NF4)
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written < needed < 10 * written  # an upper bound, not an absurd one
    assert os.listdir(small_disk) == ["models"] and (out / "provenance.json").exists()


def test_folders_on_one_filesystem_add_up(tmp_path, monkeypatch):
    usage = disk.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    assert disk.check("s", {tmp_path / "a": 600}) == {
        str(tmp_path): {"needed_bytes": 600, "free_bytes": 1000}}
    with pytest.raises(DiskFull, match=rf"^s: needs 0\.0 MiB \(1200 bytes\) in "
                                       rf"{re.escape(str(tmp_path))}, 0\.0 MiB \(1000 bytes\) "
                                       rf"free; "):
        disk.check("s", {tmp_path / "a" / "b": 600, tmp_path / "c": 600})
    monkeypatch.setenv(disk.SKIP_ENV, "1")  # a warning instead
    assert disk.check("s", {tmp_path / "c": 1001})[str(tmp_path)]["needed_bytes"] == 1001


def test_an_architecture_without_known_dimensions_is_not_estimated(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # as memory.check_stage: logged, not refused
    assert disk.check_stage("train_qlora", tmp_path, {tmp_path / "a": ["adapter"]},
                            lora={"r": 8, "target_modules": "all-linear"}) == {}


def test_a_log_on_the_full_disk_does_not_hide_the_error(small_disk):
    """The job's log is on the full disk too: its one line still reaches the terminal, and no
    OSError from writing the log replaces it (a process of its own: its real stderr)."""
    with open(small_disk / "filler", "wb", buffering=0) as handle:
        with pytest.raises(OSError):
            while True:
                handle.write(b"x" * 4096)
    job = ("from qlora_pipeline.core.errors import DiskFull\n"
           "from qlora_pipeline.jobs.environment import logged_to\n"
           f"with logged_to({str(small_disk / 'job.log')!r}):\n"
           "    raise DiskFull('quantize: no space left on device writing out')\n")
    done = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and "OSError" not in done.stderr, done.stderr
    assert "\nerror: quantize: no space left on device writing out\n" in done.stderr


def test_torch_saves_full_disk_is_enospc_at_its_folder(small_disk, tmp_path):
    """torch.save's writer says "unexpected pos ..." or "file write failed", no errno: with
    less room than the block writes it is ENOSPC at the folder; with room, left as it was."""
    import torch

    state = {"exp_avg": torch.zeros(100_000)}  # 400 KB on a 100 KiB disk
    with pytest.raises(OSError) as full:
        with disk.torch_writes(small_disk, 400_000):
            torch.save(state, small_disk / "optimizer.pt")
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(small_disk)
    assert isinstance(full.value.__cause__, RuntimeError)
    assert disk.full_disk(full.value) is full.value
    with pytest.raises(RuntimeError, match="not the disk"):  # room enough: another failure
        with disk.torch_writes(tmp_path, 400_000):
            raise RuntimeError("not the disk")
    del full  # its frames hold torch's writer, and the file open on the disk to unmount
    gc.collect()
