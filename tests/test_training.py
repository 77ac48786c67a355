"""LoRA injection, the training loop and the training stages, on the tiny quantized model.

Tiny Llama dims (conftest.build_model): hidden 64, intermediate 128, 4 heads of 16, 2 kv
heads, so q/o are 64x64, k/v 64->32, gate/up 64->128, down 128->64; two layers.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import build_inputs, job_policy, stage, task_blocks
from qlora_pipeline.config import recovery_train
from qlora_pipeline.core import disk
from qlora_pipeline.core.errors import DiskFull, InputError
from qlora_pipeline.core.files import read_jsonl
from qlora_pipeline.training import lora, loop

HIDDEN, INTER, KV_OUT, LAYERS = 64, 128, 32, 2
QV_PER_LAYER = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, KV_OUT)}
ALL_PER_LAYER = {**QV_PER_LAYER, "k_proj": (HIDDEN, KV_OUT), "o_proj": (HIDDEN, HIDDEN),
                 "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
                 "down_proj": (INTER, HIDDEN)}


def by_hand(r: int, dims: dict, layers: int = LAYERS, dora: bool = False) -> int:
    return layers * sum(r * (i + o) + (o if dora else 0) for i, o in dims.values())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> dict:
    quant, tokenized = build_inputs(tmp_path_factory.mktemp("training"), tiny_model_dir)
    return {"base": tiny_model_dir, "quant": quant, "tokenized": tokenized}


def load4(prepared):
    from qlora_pipeline.models.quantization import load_quantized

    return load_quantized(prepared["quant"], job_policy())


def train_qlora(prepared, root, lora: dict, train: dict) -> dict:
    """The train_qlora stage into root/qlora (checkpoints in root/checkpoints)."""
    return stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                                adapter=root / "qlora", lora=lora, train=train, seed=0,
                                checkpoints=root / "checkpoints")


def recover(prepared, adapter, root, recovery: dict, train: dict) -> dict:
    """The recover stage into root/recovered, with the params its rule gives it."""
    return stage("recover")(base=prepared["base"], qlora=adapter, tokenized=prepared["tokenized"],
                            adapter=root / "recovered", seed=0, checkpoints=root / "checkpoints",
                            train=recovery_train({"train": train, "recovery": recovery}))


def lora_cfg(**overrides) -> dict:
    return {**task_blocks()["lora"], **overrides}


def fast_train(**overrides) -> dict:
    return {**task_blocks()["train"], "max_steps": 30, "eval_steps": 10, "logging_steps": 5,
            "learning_rate": 5e-3, "batch_size": 8, **overrides}


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    """One QLoRA run (30 steps, high learning rate), shared by the checks below."""
    root = tmp_path_factory.mktemp("trained")
    summary = train_qlora(prepared, root, lora_cfg(), fast_train())
    return {"summary": summary, "adapter": root / "qlora", "checkpoints": root / "checkpoints"}


def leftovers(parent, name: str) -> list:
    """The output itself or a temporary sibling of it, if any was left behind."""
    if not parent.exists():
        return []
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# ---- injection -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    ({}, by_hand(8, QV_PER_LAYER)),
    ({"r": 4}, by_hand(4, QV_PER_LAYER)),
    ({"target_modules": "all-linear"}, by_hand(8, ALL_PER_LAYER)),
    ({"use_dora": True}, by_hand(8, QV_PER_LAYER, dora=True)),
    ({"layers_to_transform": [0]}, by_hand(8, QV_PER_LAYER, layers=1)),
], ids=["q_v", "r4", "all-linear", "dora", "layer0"])
def test_inject_freezes_base_and_trains_exactly_lora(prepared, overrides, expected):
    model = load4(prepared)
    cfg = lora_cfg(**overrides)
    assert lora.expected_trainable(model, cfg) == expected
    model = lora.inject(model, cfg, gradient_checkpointing=False)
    named = list(model.named_parameters())
    assert named
    frozen_wrong = [n for n, p in named if p.requires_grad and "lora_" not in n]
    assert frozen_wrong == []
    assert all(p.requires_grad for n, p in named if "lora_" in n)
    assert sum(p.numel() for _, p in named if p.requires_grad) == expected
    assert lora.verify_frozen(model, expected)["trainable_params"] == expected


def test_layers_to_transform_halves_and_all_linear_covers_every_projection(prepared):
    model = lora.inject(load4(prepared), lora_cfg(target_modules="all-linear"), False)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")
               and "default" in m.lora_A}
    assert adapted == set(ALL_PER_LAYER)
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)

    half = lora.inject(load4(prepared), lora_cfg(layers_to_transform=[0]), False)
    layers = {re.search(r"layers\.(\d+)\.", n).group(1)
              for n, p in half.named_parameters() if p.requires_grad}
    assert layers == {"0"}
    full = by_hand(8, QV_PER_LAYER)
    assert sum(p.numel() for p in half.parameters() if p.requires_grad) * 2 == full


def test_init_is_identity_and_adapters_are_float32(prepared):
    model = load4(prepared).eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    model = lora.inject(model, lora_cfg(), gradient_checkpointing=False).eval()
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(a) == len(b) == LAYERS * len(QV_PER_LAYER)
    assert all(torch.count_nonzero(p) == 0 for p in b)          # B = 0
    assert all(torch.count_nonzero(p) == p.numel() for p in a)  # A random
    assert {p.dtype for p in a + b} == {torch.float32}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # W0 + (alpha/r)·B·A with B = 0 is W0 exactly


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(prepared, rslora):
    model = lora.inject(load4(prepared), lora_cfg(r=4, alpha=16, use_rslora=rslora), False)
    scalings = [m.scaling["default"] for _, m in model.named_modules()
                if hasattr(m, "scaling") and "default" in getattr(m, "lora_A", {})]
    assert len(scalings) == LAYERS * len(QV_PER_LAYER)
    expected = 16 / math.sqrt(4) if rslora else 16 / 4
    assert scalings == pytest.approx([expected] * len(scalings))


@pytest.mark.parametrize("overrides, message", [
    ({"target_modules": ["nope"]}, r"\['nope'\].*q_proj"),
    ({"target_modules": ["q_proj", "nope"]}, r"\['nope'\]"),
    ({"r": 40}, r"lora\.r: found 40, expected at most 32"),
    ({"target_modules": "all-linear", "layers_to_transform": [0]}, r"layers_to_transform"),
    ({"layers_to_transform": [7]}, r"no targeted layer"),
], ids=["unknown", "one-unknown", "r-too-big", "layers+all-linear", "layer-out-of-range"])
def test_bad_lora_config_is_input_error_and_leaves_nothing(prepared, tmp_path, overrides,
                                                            message):
    cfg = lora_cfg(**overrides)
    with pytest.raises(InputError, match=message):
        train_qlora(prepared, tmp_path, cfg, fast_train())
    assert leftovers(tmp_path, "qlora") == []


def test_rank_bound_is_the_smallest_targeted_dimension(prepared):
    model = load4(prepared)
    lora.check(model, lora_cfg(r=32))  # v_proj's 32 outputs
    lora.check(model, lora_cfg(r=40, target_modules=["q_proj"]))  # q_proj is 64x64
    with pytest.raises(InputError, match="at most 32"):
        lora.check(model, lora_cfg(r=33))


# ---- the loop --------------------------------------------------------------------------------

def test_total_steps():
    cfg = {"max_steps": None, "epochs": 1, "batch_size": 8, "gradient_accumulation": 1}
    assert loop.total_steps(cfg, 80) == 10
    assert loop.total_steps({**cfg, "epochs": 2}, 80) == 20
    assert loop.total_steps(cfg, 81) == 11  # a last partial batch is a step
    assert loop.total_steps({**cfg, "epochs": 1.5}, 70) == 14  # 9 per epoch * 1.5 = 13.5
    assert loop.total_steps({**cfg, "epochs": 0.25}, 80) == 3  # 2.5 rounds up
    assert loop.total_steps({**cfg, "gradient_accumulation": 2}, 80) == 5
    assert loop.total_steps({**cfg, "max_steps": 7, "epochs": 3}, 80) == 7


def test_epochs_drive_the_step_count(prepared, tmp_path):
    from datasets import load_from_disk

    n_train = len(load_from_disk(str(prepared["tokenized"]))["train"])
    train = fast_train(max_steps=None, epochs=0.5, eval_steps=50)
    summary = train_qlora(prepared, tmp_path, lora_cfg(), train)
    assert summary["steps"] == math.ceil(math.ceil(n_train / 8) * 0.5)


# ---- train_qlora -----------------------------------------------------------------------------

def test_train_qlora_lowers_validation_loss(trained):
    s = trained["summary"]
    assert s["steps"] == 30
    assert math.isfinite(s["eval_loss_initial"])
    assert s["eval_loss_best"] < s["eval_loss_initial"] - 0.05, s
    assert s["trainable_params"] == by_hand(8, QV_PER_LAYER)
    assert s["optimizer"] == job_policy().optimizer("paged_adamw_8bit")


def test_train_qlora_outputs(trained):
    out = trained["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                 "summary.json", "provenance.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if {"loss", "learning_rate", "grad_norm"} <= set(r)]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert len(train_lines) >= 30 // 5
    assert len(eval_lines) >= 3  # before training, then every 10 steps
    assert all(math.isfinite(r["loss"]) for r in train_lines)
    assert max(r["learning_rate"] for r in train_lines) == pytest.approx(5e-3, rel=0.2)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_seconds"] > 0
    assert summary["tokens_per_second"] > 0
    assert summary["peak_memory_mb"] > 0
    head = summary["label_positions"]  # the output head only where the loss is taken
    assert head["used"] and head["positions_kept"] < head["positions"], head
    assert head["loss_gap"] <= head["tolerance"]
    assert summary["trainable_params"] == by_hand(8, QV_PER_LAYER)
    assert 0 < summary["trainable_pct"] < 100
    assert summary["trainable_pct"] == pytest.approx(
        100 * summary["trainable_params"] / summary["total_params"], abs=1e-3)

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "train_qlora"
    assert set(prov["inputs"]) == {"quantized", "tokenized"}
    assert prov["params"]["lora"]["r"] == 8


def test_mlflow_run_holds_the_losses_of_metrics_jsonl(prepared, tmp_path, monkeypatch):
    """train.report_to mlflow, through transformers' callback, into a local file store (plain
    text: metrics/<name> holds "timestamp value step" lines): the run, named by the trackers,
    holds every loss and validation loss of metrics.jsonl at its step; no TensorBoard files."""

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow"
    stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                         adapter=tmp_path / "qlora", lora=lora_cfg(), seed=0,
                         train=fast_train(max_steps=3, eval_steps=3, logging_steps=1),
                         checkpoints=tmp_path / "checkpoints",
                         trackers={"run": "arithmetic/qlora", "mlflow": str(store)})
    [run] = [p for p in (store / "0").iterdir() if (p / "metrics").is_dir()]  # default experiment
    assert (run / "tags/mlflow.runName").read_text() == "arithmetic/qlora"
    records = read_jsonl(tmp_path / "qlora/metrics.jsonl")
    for metric in ("loss", "eval_loss"):
        lines = (run / "metrics" / metric).read_text().splitlines()
        logged = [(int(step), float(value)) for _, value, step in map(str.split, lines)]
        assert logged == [(r["step"], r[metric]) for r in records if metric in r], metric
    assert len(logged) == 2  # before training and at step 3
    assert "MLFLOW_TRACKING_URI" not in os.environ  # set for the training only
    assert not list(tmp_path.glob("**/events.out.tfevents.*"))


def test_wandb_runs_offline_into_the_results_unless_the_user_says_otherwise(tmp_path,
                                                                            monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    trackers = {"run": "arithmetic/qlora", "wandb": str(tmp_path), "mlflow": "mlflow"}
    assert loop.tracker_environment(trackers) == {
        "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "qlora-pipeline", "WANDB_MODE": "offline",
        "MLFLOW_TRACKING_URI": (Path.cwd() / "mlflow").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    monkeypatch.setenv("WANDB_API_KEY", "from-the-user")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    assert loop.tracker_environment(trackers) == {"WANDB_DIR": str(tmp_path)}


def test_saved_adapter_is_float32_and_trained(trained):
    from safetensors.torch import load_file

    tensors = load_file(trained["adapter"] / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(b) == LAYERS * len(QV_PER_LAYER)
    assert all(torch.count_nonzero(t) > 0 for t in b)  # B moved away from its zero init


def test_checkpoints_removed_on_success(trained):
    root = trained["checkpoints"]
    assert not root.exists() or list(root.iterdir()) == []


def test_a_training_near_its_time_limit_saves_and_stops(prepared, tmp_path, monkeypatch):
    """An end time already passed (QLORA_TRAIN_DEADLINE, Slurm's stand-in): the training saves
    at its first step through Trainer's own save and raises ResumeLater; no adapter, the
    checkpoint kept for the retry (tests/test_slurm.py resumes one to the same adapter)."""
    import time

    from qlora_pipeline.core.errors import ResumeLater
    from qlora_pipeline.training import deadline

    monkeypatch.setenv(deadline.ENV_VARIABLE, str(time.time()))
    with pytest.raises(ResumeLater, match="stopped at step 1 of 30 before the job's time limit"):
        train_qlora(prepared, tmp_path, lora_cfg(), fast_train())
    assert leftovers(tmp_path, "qlora") == []
    [saved] = (tmp_path / "checkpoints").glob("*/checkpoint-*")
    assert saved.name == "checkpoint-1" and (saved / "trainer_state.json").is_file()


def test_nan_loss_stops_training_and_leaves_no_adapter(prepared, tmp_path, monkeypatch):
    inject = lora.inject

    def poisoned(model, cfg, gradient_checkpointing, **kwargs):
        model = inject(model, cfg, gradient_checkpointing, **kwargs)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.fill_(float("nan"))
        return model

    monkeypatch.setattr(lora, "inject", poisoned)
    with pytest.raises(loop.NonFiniteLoss, match=r"at step 1\b"):
        train_qlora(prepared, tmp_path, lora_cfg(), fast_train())
    assert leftovers(tmp_path, "qlora") == []


def test_interrupted_training_resumes_from_its_checkpoint(prepared, trained, tmp_path,
                                                          monkeypatch):
    """Killed before its first checkpoint (a fresh start follows), then after it (a resume):
    the end is the uninterrupted run's, its metrics.jsonl included."""
    class Interrupted(Exception):
        pass

    step = loop.GuardedTrainer.training_step

    def interrupt_at(stop: int):
        def interrupted(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == stop - 1:
                raise Interrupted
            return step(self, model, inputs, num_items_in_batch)
        return interrupted

    args = (prepared, tmp_path, lora_cfg(), fast_train())
    for stop in (8, 15):  # logging_steps 5: the first run logged steps 0 and 5, no checkpoint
        monkeypatch.setattr(loop.GuardedTrainer, "training_step", interrupt_at(stop))
        with pytest.raises(Interrupted):
            train_qlora(*args)
        assert leftovers(tmp_path, "qlora") == []
    saved = list((tmp_path / "checkpoints").glob("*/checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-10"]  # eval_steps 10: one so far
    tokens_at_10 = json.loads((saved[0] / "trainer_state.json").read_text())[
        "num_input_tokens_seen"]
    monkeypatch.undo()

    summary = train_qlora(*args)
    assert summary["resumed_from"] == str(saved[0])
    assert summary["steps"] == 30
    # Same data order and optimizer state: the same result as the uninterrupted run.
    assert summary["eval_loss_best"] == pytest.approx(trained["summary"]["eval_loss_best"],
                                                      rel=1e-5)
    # Trainer's running loss came back with the checkpoint (loop.CarriedLoss): the mean over
    # all 30 steps, not over the 20 after the resume.
    assert summary["train_loss"] == pytest.approx(trained["summary"]["train_loss"], rel=1e-6)
    # The loss before training, from the log history the checkpoint brought back.
    assert summary["eval_loss_initial"] == pytest.approx(
        trained["summary"]["eval_loss_initial"], rel=1e-5)
    # Throughput counts only the tokens this (resumed) run processed.
    assert summary["tokens_seen"] == trained["summary"]["tokens_seen"]
    assert summary["tokens_per_second"] * summary["train_seconds"] == pytest.approx(
        summary["tokens_seen"] - tokens_at_10, rel=0.05)
    assert not saved[0].exists()
    # Each log event once: neither killed run's records are kept twice (the fresh start
    # forgot the first run's, the resume the second run's after step 10).
    def events(adapter):
        return [(r["step"], sorted(k for k in r if k != "epoch"))
                for r in read_jsonl(adapter / "metrics.jsonl")]
    assert events(tmp_path / "qlora") == events(trained["adapter"])


def test_a_job_that_failed_after_its_last_checkpoint_ends_as_if_it_had_not(prepared, trained,
                                                                           tmp_path,
                                                                           monkeypatch):
    """The training done, the job fails before its outputs land (a full disk, fault campaign
    trial 143): the rerun does not resume at the last step (Trainer would train a 31st), and
    ends with the uninterrupted run's steps, loss and log."""
    from qlora_pipeline.stages import train as train_stage

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    args = (prepared, tmp_path, lora_cfg(), fast_train())
    monkeypatch.setattr(train_stage, "write_json", full)
    with pytest.raises(DiskFull):
        train_qlora(*args)
    assert "checkpoint-30" in {p.name for p in (tmp_path / "checkpoints").glob("*/checkpoint-*")}
    monkeypatch.undo()
    summary = train_qlora(*args)
    assert summary["steps"] == 30 and summary["resumed_from"].endswith("checkpoint-20")
    assert summary["train_loss"] == pytest.approx(trained["summary"]["train_loss"], rel=1e-6)
    assert [r["step"] for r in read_jsonl(tmp_path / "qlora" / "metrics.jsonl")] == \
        [r["step"] for r in read_jsonl(trained["adapter"] / "metrics.jsonl")]


def test_checkpoints_of_another_configuration_are_discarded(tmp_path):
    for key in ("aaaa", "bbbb"):
        (tmp_path / key / "checkpoint-5").mkdir(parents=True)
    assert loop.resume_folder(tmp_path, "bbbb") == tmp_path / "bbbb"
    assert [p.name for p in tmp_path.iterdir()] == ["bbbb"]
    assert (tmp_path / "bbbb" / "checkpoint-5").is_dir()


def test_a_training_whose_checkpoint_fills_the_disk_fails_in_one_line(prepared, small_disk,
                                                                     tmp_path, monkeypatch):
    """Checkpoints on the 100 KiB disk, the adapter elsewhere: the first save fills it (an
    adapter's optimizer state by torch.save) and the job ends in one DiskFull line naming its
    output and the checkpoint folder, with no output left."""
    monkeypatch.setenv(disk.SKIP_ENV, "1")  # the estimate would refuse before training
    out = tmp_path / "qlora"
    with pytest.raises(DiskFull) as full:
        stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                             adapter=out, seed=0,
                             checkpoints=small_disk / "checkpoints",
                             lora={**task_blocks()["lora"], "r": 32},
                             train={**task_blocks()["train"], "max_steps": 4, "eval_steps": 2})
    assert re.fullmatch(rf"train_qlora: no space left on device writing {re.escape(str(out))} "
                        rf"\(at {re.escape(str(small_disk))}/checkpoints/\S+/checkpoint-2\); .*",
                        str(full.value))
    assert "\n" not in str(full.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["disk"]
    del full  # its frames hold torch's writer, and the file open on the disk to unmount
    gc.collect()


# ---- recovery --------------------------------------------------------------------------------

def test_recovery_without_adapter_is_input_error(prepared, tmp_path):
    blocks = task_blocks()
    missing = tmp_path / "adapters" / "qlora"
    with pytest.raises(InputError, match=r"no QLoRA adapter at .*adapters/qlora"):
        recover(prepared, missing, tmp_path, {**blocks["recovery"], "enabled": True, "steps": 3},
                fast_train())
    assert leftovers(tmp_path, "recovered") == []


def test_recovery_continues_the_qlora_adapter(prepared, trained, tmp_path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    blocks = task_blocks()
    recovery = {**blocks["recovery"], "enabled": True, "steps": 3, "learning_rate": 1e-4}
    out = tmp_path / "recovered"
    summary = recover(prepared, trained["adapter"], tmp_path, recovery, fast_train())
    assert summary["steps"] == 3
    assert math.isfinite(summary["eval_loss_initial"])
    # It starts where QLoRA ended: not at the untrained loss.
    qlora = trained["summary"]
    assert summary["eval_loss_initial"] < qlora["eval_loss_initial"] - 0.05, (summary, qlora)
    assert summary["trainable_params"] == qlora["trainable_params"]  # counted and checked

    assert PeftConfig.from_pretrained(str(out)).peft_type == "LORA"
    before = load_file(trained["adapter"] / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert set(before) == set(after)
    assert {t.dtype for t in after.values()} == {torch.float32}
    for key, weight in before.items():  # 3 small steps from the QLoRA weights
        assert torch.allclose(after[key], weight, atol=3e-3), key
    assert any(not torch.equal(after[k], before[k]) for k in before)  # but it did train
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "recover" and set(prov["inputs"]) == {"base", "qlora", "tokenized"}
    assert prov["params"]["train"]["max_steps"] == 3 and prov["params"]["train"]["epochs"] is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())



def test_recovery_checks_the_trainable_count(prepared, trained, tmp_path, monkeypatch):
    """Recovery's trainable parameters are counted against the saved adapter's LoRA
    arithmetic, as QLoRA's are (a base weight made trainable is refused)."""
    prepare = lora.prepare_recovery

    def one_more_trainable(*args, **kwargs):
        model, expected = prepare(*args, **kwargs)
        return model, expected + 1

    monkeypatch.setattr("qlora_pipeline.training.lora.prepare_recovery", one_more_trainable)
    with pytest.raises(RuntimeError, match="trainable parameters .* != LoRA arithmetic"):
        recover(prepared, trained["adapter"], tmp_path, {**task_blocks()["recovery"],
                                                         "enabled": True, "steps": 2},
                fast_train())
    assert leftovers(tmp_path, "recovered") == []


@pytest.mark.parametrize("grouped", [False, True])
def test_group_by_length_picks_trainers_length_grouped_sampler(tmp_path, tiny_model_dir, grouped):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert task_blocks()["train"]["group_by_length"] is False  # the schema's default
    cfg = {**task_blocks()["train"], "group_by_length": grouped}
    args = loop.arguments(cfg, tmp_path, train_examples=64, seed=0, policy=job_policy())
    data = Dataset.from_dict({"input_ids": [[1] * (1 + i % 7) for i in range(64)]})
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                      train_dataset=data, eval_dataset=data)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler) == grouped
