"""Two runs from scratch on the CPU give identical tokenized data, quantized checkpoint and
adapter (the stages are called directly: the same code the Snakemake jobs run)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage
from qlora_pipeline import config as cfgmod

TASK = {"format": "chat",
        "dataset": {"source": "builtin", "name": "arithmetic", "num_examples": 40, "seed": 3},
        "train": {"max_steps": 4, "eval_steps": 2, "batch_size": 4}}
QUANT = {"method": "nf4", "double_quant": True, "compute_dtype": "auto",
         "skip_modules": ["lm_head"]}


def run_once(root, model_dir):
    task = cfgmod.validate(copy.deepcopy(TASK), cfgmod.load_schema("task.schema.yaml"), "test")
    stage("fetch_dataset")(raw=root / "raw", dataset=task["dataset"], format=task["format"])
    stage("tokenize")(raw=root / "raw", base=model_dir, tokenized=root / "tokenized",
                      format=task["format"], tokenize=task["tokenize"])
    stage("quantize")(base=model_dir, quantized=root / "quantized", quantization=QUANT, seed=0)
    stage("train_qlora")(quantized=root / "quantized", tokenized=root / "tokenized",
                         adapter=root / "adapter", lora=task["lora"], train=task["train"],
                         seed=0, checkpoints=root / "checkpoints")
    return root


def same_tensors(a, b) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU determinism; see docs/reproducibility.md")
def test_two_runs_from_scratch_are_identical(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    first = run_once(tmp_path / "one", tiny_model_dir)
    second = run_once(tmp_path / "two", tiny_model_dir)
    for split in ("train", "validation", "test"):
        assert (first / "raw" / f"{split}.jsonl").read_bytes() == \
            (second / "raw" / f"{split}.jsonl").read_bytes()
        one = load_from_disk(str(first / "tokenized"))[split].to_dict()
        two = load_from_disk(str(second / "tokenized"))[split].to_dict()
        assert one == two
    same_tensors(first / "quantized/model.safetensors", second / "quantized/model.safetensors")
    same_tensors(first / "adapter/adapter_model.safetensors",
                 second / "adapter/adapter_model.safetensors")
