"""The rank side of a distributed training (launch.py starts the processes): which process
this is, which one writes, and what each strategy asks of the Trainer.

DDP: every rank holds the whole (4-bit) model and its own adapter copy; the Trainer (through
accelerate) wraps it, shards each global batch across ranks and averages gradients, with the
loss averaged over the global batch's tokens (`average_tokens_across_devices`), so N processes
at batch b train what one process trains at batch N·b. FSDP: parameters sharded across ranks;
it needs CUDA here (docs/cluster.md) and a 4-bit checkpoint stored in a float dtype.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..core.errors import InputError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes the outputs, the metrics log and TensorBoard; the others only train."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def any_rank(flag: bool, device) -> bool:
    """`flag` of any rank, on every rank (one all-reduce of one number): a decision each rank
    takes on its own clock or signal, taken by all at the same step."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    flags = torch.tensor([int(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def fsdp_shards(distributed: dict) -> int:
    """The ranks FSDP shards this training's model over (1: not sharded): its memory
    estimate's (core/memory.rank_peak)."""
    return world_size() if distributed.get("strategy") == "fsdp" else 1


@contextlib.contextmanager
def rank_folder(path):
    """`path` on rank 0, which writes the outputs; elsewhere a throwaway folder, so that the
    code runs the same on every rank and only rank 0's result lands."""
    if is_main():
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=f".rank{rank()}-") as scratch:
        yield Path(scratch)


def save_adapter(trainer, model, out_dir: Path) -> None:
    """The PEFT adapter, whole, in out_dir. Under FSDP each rank holds a shard: every rank
    takes part in gathering the full state dict (accelerate), rank 0 saves it; otherwise the
    model's own adapter weights, as a single process saves them."""
    if getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if is_main():
            model.save_pretrained(out_dir, state_dict=state)
        return
    model.save_pretrained(out_dir)


def optimizer(name: str, distributed: dict) -> str:
    """PEFT's FSDP guide: with FSDP-QLoRA, paged_adamw_8bit fails when a checkpoint is saved;
    its 32-bit sibling does not."""
    if distributed.get("strategy") == "fsdp" and name == "paged_adamw_8bit":
        return "paged_adamw_32bit"
    return name


def trainer_arguments(distributed: dict, cuda: bool) -> dict:
    """TrainingArguments for the strategy. Refused where it cannot run here."""
    strategy = distributed.get("strategy", "none")
    if strategy == "none" or not active():
        return {}
    common = {"average_tokens_across_devices": True,
              "ddp_backend": "nccl" if cuda else "gloo"}
    if strategy == "ddp":
        # LoRA leaves most of the model frozen: only the adapter takes part in the reduction.
        return {**common, "ddp_find_unused_parameters": False}
    if not cuda:
        # Measured: on the CPU, Trainer given fsdp runs plain DDP (accelerate's FSDP needs an
        # accelerator), so the job would claim a sharding it does not do.
        raise InputError("train.distributed.strategy: found fsdp on a machine without CUDA; "
                         "expected ddp here (on the CPU, accelerate runs FSDP as plain DDP: "
                         "docs/cluster.md)")
    return {**common, "fsdp": True,
            "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "reshard_after_forward": True, "cpu_ram_efficient_loading": True,
                            "state_dict_type": "FULL_STATE_DICT"}}
