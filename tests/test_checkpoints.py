"""Checkpoint manifests (training/checkpoints.py): each file kind Trainer writes, cut short or
with one bit flipped, fails verification; a resume takes the newest checkpoint that verifies;
one job at a time holds a checkpoint folder."""

from __future__ import annotations

import json
import os
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.training import checkpoints, loop

# The files of a LoRA checkpoint, as Trainer names them.
KINDS = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "trainer_state.json", "training_args.bin")


def checkpoint(folder, step: int, best: int | None = None):
    """A checkpoint-like folder (each kind of file, real formats) with its manifest."""
    folder = folder / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    save_file({"lora_A": torch.randn(8, 16, generator=generator)},
              folder / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.randn(64, generator=generator)}}},
               folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"seed": 0}, folder / "training_args.bin")
    state = {"global_step": step, "best_model_checkpoint":
             None if best is None else str(folder.parent / f"checkpoint-{best}")}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    checkpoints.write_manifest(folder)
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1])


def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # in the data, past any header: still loads, wrongly
    path.write_bytes(bytes(data))


def test_an_intact_checkpoint_verifies(tmp_path):
    folder = checkpoint(tmp_path, 4)
    assert checkpoints.verify(folder) is None
    listed = json.loads((folder / checkpoints.MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(KINDS)
    assert listed["scheduler.pt"]["size"] == (folder / "scheduler.pt").stat().st_size


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_file_fails_by_its_size(tmp_path, kind):
    folder = checkpoint(tmp_path, 4)
    size = (folder / kind).stat().st_size
    truncate(folder / kind)
    assert checkpoints.verify(folder) == f"{kind}: size {size - 1} bytes, expected {size}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_bit_fails_by_its_checksum(tmp_path, kind):
    folder = checkpoint(tmp_path, 4)
    flip_bit(folder / kind)
    assert checkpoints.verify(folder) == f"{kind}: sha256 differs from the manifest's"


def test_a_missing_file_or_manifest_fails(tmp_path):
    folder = checkpoint(tmp_path, 4)
    (folder / "rng_state.pth").unlink()
    assert checkpoints.verify(folder) == "rng_state.pth missing"
    manifest = folder / checkpoints.MANIFEST
    manifest.write_text(manifest.read_text().replace('"size"', '"sizf"'))
    assert checkpoints.verify(folder) == "manifest.json unreadable (KeyError: 'size')"
    manifest.unlink()  # a save killed before its end
    assert checkpoints.verify(folder).startswith("manifest.json missing")


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    for step in (4, 8):
        checkpoint(tmp_path, step, best=step)
    flip_bit(tmp_path / "checkpoint-8" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        resume, state = loop.last_complete_checkpoint(tmp_path)
    assert (resume, state.global_step) == (str(tmp_path / "checkpoint-4"), 4)
    assert not (tmp_path / "checkpoint-8").exists()
    assert "checkpoint-8: optimizer.pt: sha256 differs" in caplog.text


def test_a_checkpoint_whose_best_failed_is_not_resumed(tmp_path, caplog):
    """Its best checkpoint gone, the training could not end on it as an uninterrupted one
    does: the newer one goes too, and the training starts afresh."""
    checkpoint(tmp_path, 4, best=4)
    checkpoint(tmp_path, 8, best=4)
    truncate(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        assert loop.last_complete_checkpoint(tmp_path) == (None, None)
    assert list(tmp_path.iterdir()) == []
    assert "checkpoint-8: its best checkpoint checkpoint-4" in caplog.text


HOLDER = """
import sys
from qlora_pipeline.training import checkpoints
with checkpoints.locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_held_checkpoint_folder_is_refused_until_its_holder_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(InputError, match=rf"^checkpoints {tmp_path} are being written by "
                                             rf"another running job \(pid {holder.pid} on "):
            with checkpoints.locked(tmp_path):
                pass
        # the lock file survives the discarding of other configurations' checkpoints
        (tmp_path / "other").mkdir()
        loop.resume_folder(tmp_path, "mine")
        assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoints.LOCK, "mine"]
    finally:
        holder.communicate("")  # the holder ends: the kernel releases its lock
    with checkpoints.locked(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / checkpoints.LOCK).read_text()


def test_a_checkpoint_at_the_last_step_is_not_resumed(tmp_path, caplog):
    """Trainer checks its end after a step: resumed at max_steps it would train one more. The
    one before is resumed instead, and the last steps are trained again."""
    for step in (4, 8):
        checkpoint(tmp_path, step, best=step)
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        resume, state = loop.last_complete_checkpoint(tmp_path, max_steps=8)
    assert (resume, state.global_step) == (str(tmp_path / "checkpoint-4"), 4)
    assert "checkpoint-8: it is the last step (8)" in caplog.text
    assert loop.last_complete_checkpoint(tmp_path, max_steps=9)[1].global_step == 4
