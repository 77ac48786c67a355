"""The runtime policy: one answer per job to device, dtypes, optimizer, checkpointing and
evaluation batch size, on a CPU and (as a description) on CUDA GPUs with and without bf16."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.core.policy import Policy, torch_dtype

CPU = Policy("cpu", "cpu:2 cores", bf16=False, threads=2)
AMPERE = Policy("cuda", "cuda:A100", bf16=True, threads=8)
VOLTA = Policy("cuda", "cuda:V100", bf16=False, threads=8)


def test_detect_on_this_machine():
    policy = Policy.detect(threads=3)
    assert policy.threads == 3
    assert policy.cuda == torch.cuda.is_available()
    assert policy.device_name.startswith("cuda:" if policy.cuda else "cpu:")
    assert Policy.detect().threads == torch.get_num_threads()


@pytest.mark.parametrize("policy, auto, full", [
    (CPU, torch.float32, torch.float32),
    (AMPERE, torch.bfloat16, torch.bfloat16),
    (VOLTA, torch.float16, torch.float32),
])
def test_dtypes(policy, auto, full):
    assert policy.compute_dtype("auto") == auto
    assert policy.full_precision_dtype == full
    assert policy.compute_dtype("bfloat16") == torch.bfloat16  # a configured one is kept


def test_optimizer_checkpointing_and_eval_batch():
    assert CPU.optimizer("paged_adamw_8bit") == CPU.optimizer("paged_adamw_32bit") == "adamw_torch"
    assert CPU.optimizer("adafactor") == "adafactor"
    assert AMPERE.optimizer("paged_adamw_8bit") == "paged_adamw_8bit"
    assert CPU.gradient_checkpointing("auto") is False and AMPERE.gradient_checkpointing("auto")
    assert CPU.gradient_checkpointing(True) is True
    assert CPU.eval_batch_size("auto") == 8 and AMPERE.eval_batch_size("auto") == "auto"
    assert CPU.eval_batch_size(4) == 4


def test_dtype_names():
    assert torch_dtype("float16") == torch_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="'int8'.*float32, bfloat16, float16"):
        torch_dtype("int8")
