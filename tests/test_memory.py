"""Each stage's peak memory estimated from shapes before it loads (memory.py), the refusal of a
stage that would not fit, and the placement that offloads a full-precision model."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import build_inputs, job_policy, stage, task_blocks

from benchmarks.memory_model import planned_shapes
from qlora_pipeline.core import memory
from qlora_pipeline.models import methods
from qlora_pipeline.training import distributed
from benchmarks.tiny_models import build_model, save_model

# Published parameter counts of the Llama 3.1 family, and their configs' dimensions.
LLAMA_31 = {
    "8B": ({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
           8_030_261_248),
    "70B": ({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
            70_553_706_496),
    "405B": ({"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
              "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256},
             405_853_388_800),
}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_shapes_are_read_from_the_headers_alone(tmp_path, tiny_tokenizer, arch):
    model_dir = save_model(tmp_path / arch, tiny_tokenizer, arch)
    shapes = memory.Shapes.from_checkpoint(model_dir)
    model = build_model(len(tiny_tokenizer), arch=arch)
    assert shapes.params == sum(p.numel() for p in model.parameters())  # tied counted once
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and ".layers." in n)
    assert shapes.linear_params == blocks  # the 2-D weights of the blocks: what is quantized
    assert shapes.stored_bytes == 4 * shapes.params  # float32
    assert (shapes.hidden, shapes.layers, shapes.vocab) == (64, 2, len(tiny_tokenizer))


@pytest.mark.parametrize("size", sorted(LLAMA_31))
def test_planning_shapes_match_the_published_parameter_counts(size):
    config, published = LLAMA_31[size]
    shapes = planned_shapes(config)
    assert shapes.params == pytest.approx(published, rel=1e-3)


def test_estimate_parts_follow_the_settings():
    shapes = planned_shapes(LLAMA_31["8B"][0])
    lora = {"r": 16, "target_modules": "all-linear"}
    nf4 = methods.of("nf4").theoretical_bits({"double_quant": True})
    kwargs = dict(weights="4bit", compute_bytes=2, fp_bytes=2, batch=1, seq=2048, lora=lora,
                  training=True, efficient_attention=True, bits=nf4)
    plain = memory.estimate("train", shapes, **kwargs)
    checkpointed = memory.estimate("train", shapes, **kwargs, checkpointing=True)
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 5
    assert plain.parts["weights"] == pytest.approx(
        shapes.linear_params * nf4 / 8 + shapes.other_params * 2
        + shapes.largest_tensor * 4, rel=1e-9)
    # NF4 with double quantization, about 4.13 bits per block weight, embeddings and head in
    # bf16: 5.7 GB for 8B (QLoRA's "8B in about 6 GB").
    assert 5.0e9 < memory.quantized_bytes(shapes, 2, nf4) < 6.5e9
    with pytest.raises(ValueError, match="need the method's bits per weight"):
        memory.estimate("train", shapes, **{**kwargs, "bits": None})
    assert plain.parts["adapter"] == memory.lora_params(shapes, lora) * 16  # AdamW: fp32 states
    assert memory.lora_params(shapes, {"r": 8, "target_modules": ["q_proj", "v_proj"]}) == \
        8 * 32 * 2 * (4096 + 4096)
    inference = memory.estimate("evaluate", shapes, weights="full", compute_bytes=2,
                                fp_bytes=2, batch=1, seq=2048)
    assert inference.parts["weights"] == shapes.params * 2
    assert inference.parts["logits"] < plain.parts["logits"]  # no gradient


def test_fsdp_counts_every_ranks_load_of_the_whole_model(monkeypatch):
    """FSDP shards training's memory, but each rank first loads the whole 4-bit model and
    injects the adapter (float32) on its GPU: Llama-3.1-70B on 8 GPUs of 24 GiB would train in
    11.4 GiB each but cannot load (37.6 GiB); refused naming the load, not the batch."""
    gib = 2**30
    nf4 = methods.of("nf4").theoretical_bits({"double_quant": True})
    shapes = planned_shapes(LLAMA_31["70B"][0])
    shapes = dataclasses.replace(shapes, stored_bytes=memory.quantized_bytes(shapes, 2, nf4))
    lora = {"r": 16, "target_modules": "all-linear"}
    settings = dict(weights="stored", compute_bytes=2, fp_bytes=2, batch=1, seq=2048,
                    lora=lora, training=True, checkpointing=True, efficient_attention=True,
                    optimizer="paged_adamw_8bit")
    training = memory.estimate("train_qlora", shapes, shards=8, **settings)
    peak = memory.rank_peak("train_qlora", shapes, shards=8, **settings)
    assert peak.parts == {"baseline": 0, "weights": shapes.stored_bytes,
                          "adapter": memory.lora_params(shapes, lora) * 4}
    assert round(training.total / gib, 1) == 11.4 and round(peak.total / gib, 1) == 37.6
    assert memory.rank_peak("train_qlora", shapes, shards=2, **settings) == peak  # same load
    # One GPU (or DDP): training's own peak; FSDP with long batches: training's sharded peak.
    assert memory.rank_peak("train_qlora", shapes, **settings) == \
        memory.estimate("train_qlora", shapes, **settings)
    big = {**settings, "batch": 8, "checkpointing": False}
    assert memory.rank_peak("train_qlora", shapes, shards=2, **big) == \
        memory.estimate("train_qlora", shapes, shards=2, **big)

    monkeypatch.setattr(memory, "available_bytes", lambda device: (24 * gib, "free on cuda:0"))
    memory.check(training, "cuda:0", "train.batch_size smaller")  # the sharded training fits
    with pytest.raises(memory.MemoryRefused) as info:
        memory.check(peak, "cuda:0", "train.batch_size smaller")
    message = str(info.value)
    assert message.startswith("train_qlora at load (every rank holds the whole model before "
                              "FSDP shards it): estimated peak memory 37.64 GiB (weights "
                              "36.80, adapter 0.84) exceeds 95% of the 24.00 GiB free on "
                              "cuda:0; expected it to fit: GPUs that each hold the whole "
                              "model: more GPUs do not lower this peak"), message
    assert "\n" not in message and "batch_size" not in message
    # The training stages pass a rank's FSDP ranks, and none without FSDP.
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert distributed.fsdp_shards({"strategy": "fsdp", "processes": 4, "nodes": 2}) == 8
    assert distributed.fsdp_shards({"strategy": "ddp", "processes": 4, "nodes": 2}) == 1


def test_a_stage_that_cannot_fit_is_refused_before_loading(monkeypatch, tmp_path, tiny_model_dir):
    quantized, tokenized = build_inputs(tmp_path, tiny_model_dir)
    blocks = task_blocks()
    train = {**blocks["train"], "max_steps": 2, "eval_steps": 1}
    monkeypatch.setattr(memory, "available_bytes", lambda device: (50 * 2**20, "available RAM"))
    loaded = []
    monkeypatch.setattr("qlora_pipeline.training.lora.prepare_qlora",
                        lambda *a, **k: loaded.append(1))
    adapter = tmp_path / "adapter"
    with pytest.raises(memory.MemoryRefused) as info:
        stage("train_qlora")(quantized=quantized, tokenized=tokenized, adapter=adapter,
                             lora=blocks["lora"], train=train, seed=0,
                             checkpoints=tmp_path / "checkpoints")
    message = str(info.value)
    assert message.startswith("train_qlora: estimated peak memory")
    for part in ("weights", "activations", "logits", "0.05 GiB available RAM",
                 "train.batch_size", "gradient_checkpointing", "QLORA_SKIP_MEMORY_CHECK=1"):
        assert part in message, part
    assert not loaded and not adapter.exists()  # nothing loaded, nothing left behind

    # The escape hatch: the job goes on, with the warning in its log.
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    record = memory.check(memory.Estimate("x", {"weights": 2**30}), "cpu", "less")
    assert record["total_mb"] == 1024.0


def test_training_logs_its_estimate(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """The estimate goes to the job's log (memory.py is infrastructure: nothing it computes
    reaches an output), where the default run's test reads it back."""
    quantized, tokenized = build_inputs(tmp_path, tiny_model_dir)
    blocks = task_blocks()
    train = {**blocks["train"], "max_steps": 2, "eval_steps": 1, "batch_size": 4}
    records = []
    check = memory.check_stage
    monkeypatch.setattr(memory, "check_stage", lambda *a, **k: records.append(check(*a, **k)))
    with caplog.at_level("INFO", logger="qlora_pipeline.core.memory"):
        stage("train_qlora")(quantized=quantized, tokenized=tokenized, adapter=tmp_path / "a",
                             lora=blocks["lora"], train=train, seed=0,
                             checkpoints=tmp_path / "checkpoints")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    estimate, = records
    assert "memory_estimate" not in summary
    assert re.search(r"memory estimate of train_qlora: [\d.]+ GiB", caplog.text)
    assert estimate["stage"] == "train_qlora" and estimate["available_mb"] > 0
    # The 4-bit checkpoint loads as stored: its tensors' bytes (the file less its header).
    stored = sum(p.stat().st_size for p in quantized.glob("*.safetensors")) / 2**20
    assert 0.5 * stored <= estimate["parts_mb"]["weights"] <= stored
    if not job_policy().cuda:  # the process's resident memory is part of a CPU job's peak
        assert estimate["parts_mb"]["baseline"] > 100
        # Not wildly off (this process's lifetime peak includes earlier tests; the default
        # run's test compares SmolLM2's stages, where the model's own parts dominate).
        assert 0.5 * estimate["total_mb"] <= summary["peak_memory_mb"] \
            <= 1.2 * estimate["total_mb"]


def test_offload_only_when_the_gpu_is_short_and_ram_can_hold_the_rest():
    gib = 2**30
    assert memory.offload_plan(10 * gib, gpu_free=40 * gib, cpu_available=100 * gib) is None
    plan = memory.offload_plan(40 * gib, gpu_free=24 * gib, cpu_available=100 * gib)
    assert plan == {"gpu": 18 * gib, "cpu": int(100 * gib * memory.HEADROOM)}
    assert memory.offload_plan(200 * gib, gpu_free=24 * gib, cpu_available=100 * gib) is None
    # On the CPU a full-precision model is placed on the CPU, never split.
    assert memory.full_precision_placement("unused", job_policy()) == {"device_map": "cpu"} \
        or job_policy().cuda


def test_a_config_without_the_usual_names_is_not_estimated(tmp_path, tiny_model_dir):
    """An architecture whose config.json names its sizes otherwise gets no estimate and no
    refusal (logged), rather than a crash; a multimodal config's text_config is read."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    text = {k: config.pop(k) for k in ("hidden_size", "num_hidden_layers")}
    (model_dir / "config.json").write_text(json.dumps(config))
    record = memory.check_stage("evaluate", model_dir, job_policy(), weights="full")
    assert record == {"stage": "evaluate",
                      "skipped": "config.json gives no hidden, layers"}
    (model_dir / "config.json").write_text(json.dumps({**config, "text_config": text}))
    assert memory.Shapes.from_checkpoint(model_dir).hidden == 64
    assert memory.check_stage("evaluate", model_dir, job_policy(), weights="full")["total_mb"] > 0
