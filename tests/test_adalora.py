"""lora.type adalora: the config's refusals, the trainable count, the ranks pruned to the
budget, a bitwise resume and the gradient guard's rule (the merge: test_merge.py).

Tiny Llama (conftest): q_proj 64x64, v_proj 64->32, two layers, so q/v adapters are 4 matrices.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (build_inputs, build_model, pruned_adalora, stage, task_blocks,
                      write_yaml)
from safetensors.torch import load_file

from qlora_pipeline.config import load_config
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.training import adalora, gradient_guard, lora, loop

INIT_R, R, STEPS = 4, 2, 10
TASK = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                      "num_examples": 20}}


DEFAULTS = {"init_r": 12, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5}  # the schema's, filled for an AdaLoRA row only


def ada_cfg(**adalora_overrides) -> dict:
    return {**task_blocks()["lora"], "type": "adalora", "r": R,
            "adalora": {**DEFAULTS, "init_r": INIT_R, "tinit": 3, "tfinal": 1,
                        **adalora_overrides}}


# ---- config ----------------------------------------------------------------------------------

def load_task(tmp_path, lora_block: dict, method: str = "nf4", **task) -> dict:
    write_yaml(tmp_path / "config/tasks/arithmetic.yaml",
               {**copy.deepcopy(TASK), "lora": lora_block, **task})
    config = {"tasks": ["arithmetic"], "base_model": {"source": "local", "path": "/models/tiny"},
              "quantization": {"method": method}}
    return load_config(config, root=tmp_path)[1]["arithmetic"]


def test_schema_defaults(tmp_path):
    got = load_task(tmp_path, {"type": "adalora"})["lora"]
    assert got["adalora"] == DEFAULTS
    plain = load_task(tmp_path, {})["lora"]  # a plain row's block (and params) as before
    assert "type" not in plain and "adalora" not in plain


@pytest.mark.parametrize("lora_block, method, task, ends", [
    ({"r": 16}, "nf4", {}, "key 'lora.adalora.init_r': found 12, below lora.r 16 (AdaLoRA's "
     "target rank); expected at least 16"),
    ({"init": "gaussian", "use_dora": True}, "nf4", {},
     "key 'lora.use_dora': found true with lora.type adalora; expected false (PEFT's AdaLoRA "
     "has no DoRA)"),
    ({"rank_pattern": {"q_proj": 2}}, "nf4", {}, "key 'lora.rank_pattern': found {'q_proj': 2} "
     "with lora.type adalora; expected none (AdaLoRA sets each layer's rank itself, within r "
     "per adapted matrix)"),
    ({}, "hqq", {}, "key 'quantization.method': found hqq with lora.type adalora; expected nf4, "
     "fp4 or int8 (PEFT's AdaLoRA has layers for bitsandbytes and GPTQ, not HQQ)"),
    ({}, "nf4", {"recovery": {"enabled": True}}, "key 'recovery': recovered with lora.type "
     "adalora; expected recovery off (recovery continues a plain LoRA adapter of fixed rank)"),
    ({"adalora": {"tinit": 30, "tfinal": 10}}, "nf4", {"train": {"max_steps": 40}},
     "key 'lora.adalora': tinit + tfinal is 40, leaving no pruning steps in train.max_steps "
     "40; expected a sum below it"),
    ({"use_rslora": True}, "nf4", {}, "key 'lora.use_rslora': found true with lora.type "
     "adalora; expected false (AdaLoRA scales by alpha / its initial rank)"),
    ({}, "nf4", {"train": {"distributed": {"strategy": "fsdp", "processes": 2}}},
     "key 'train.distributed.strategy': found fsdp with lora.type adalora; expected ddp or one "
     "process (AdaLoRA's rank allocator reads whole parameters and their gradients)"),
])
def test_refusals_end_in_their_message(tmp_path, lora_block, method, task, ends):
    with pytest.raises(InputError) as info:
        load_task(tmp_path, {"type": "adalora", **lora_block}, method, **task)
    assert str(info.value).endswith(ends)


def test_a_sweep_point_is_refused_by_its_own_settings(tmp_path):
    sweep = {"lora.type": ["lora", "adalora"], "lora.use_dora": [True]}
    with pytest.raises(InputError, match=r"\(sweep point typeadalora-use_doratrue\): key "
                                         r"'lora.use_dora'"):
        load_task(tmp_path, {}, sweep=sweep)
    assert load_task(tmp_path, {}, sweep={"lora.type": ["lora", "adalora"]})


# ---- injection -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]),
                                           ("gpt_neox", ["query_key_value", "dense"])])
def test_trainable_count_is_init_r_times_dims_plus_e(tiny_tokenizer, arch, targets):
    cfg = {**ada_cfg(), "target_modules": targets}
    model = build_model(len(tiny_tokenizer), arch=arch)
    dims = [(m.in_features, m.out_features) for _, m in lora.targeted_layers(model, targets)]
    expected = lora.expected_trainable(model, cfg)
    assert expected == sum(INIT_R * (i + o) + INIT_R for i, o in dims)
    peft_model = lora.inject(model, cfg, False, total_steps=STEPS)
    assert lora.verify_frozen(peft_model, expected)["trainable_params"] == expected
    assert adalora.allocator(peft_model).target_bgt == R * len(dims)


def test_init_r_is_bounded_by_the_smallest_targeted_dimension(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    with pytest.raises(InputError, match=r"^lora.adalora.init_r: found 33, expected at most 32 "
                                         r"\(the smallest dimension of a targeted layer\)$"):
        lora.inject(model, ada_cfg(init_r=33), False, total_steps=STEPS)


def test_a_schedule_without_pruning_steps_is_refused(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    with pytest.raises(InputError, match=r"^lora.adalora: tinit 6 \+ tfinal 4 leave no pruning "
                                         r"steps in a training of 10 steps"):
        lora.inject(model, ada_cfg(tinit=6, tfinal=4), False, total_steps=STEPS)


# ---- training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> dict:
    quant, tokenized = build_inputs(tmp_path_factory.mktemp("adalora"), tiny_model_dir)
    return {"quant": quant, "tokenized": tokenized}


def train(prepared, root) -> dict:
    cfg = {**task_blocks()["train"], "max_steps": STEPS, "eval_steps": 5, "logging_steps": 1,
           "learning_rate": 5e-3, "batch_size": 8}
    return stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                                adapter=root / "qlora", lora=ada_cfg(beta1=0.95, beta2=0.95),
                                train=cfg, seed=0,
                                checkpoints=root / "checkpoints")


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adalora-run")
    return {"summary": train(prepared, root), "adapter": root / "qlora"}


def test_ranks_shrink_to_the_budget(trained):
    saved = json.loads((trained["adapter"] / "rank_pattern.json").read_text())
    budget = R * 4
    assert saved["budget"] == budget
    ranks = saved["ranks"]
    assert len(ranks) == 4 and all(0 <= k <= INIT_R for k in ranks.values())
    # PEFT may prune a little more on ties, never less.
    assert budget - 2 <= sum(ranks.values()) <= budget
    tensors = load_file(trained["adapter"] / "adapter_model.safetensors")
    assert {m: tensors[f"base_model.model.{m}.lora_E"].shape[0] for m in ranks} == ranks
    summary = trained["summary"]
    assert summary["adalora"] == {"budget": budget, "rank": sum(ranks.values())}
    assert summary["trainable_params"] == 2 * INIT_R * ((64 + 64 + 1) + (64 + 32 + 1))
    logged = [json.loads(line) for line in
              (trained["adapter"] / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["effective_rank"]) for r in logged if "loss" in r]
    assert steps[0] == (0, 4 * INIT_R) or steps[0][1] == 4 * INIT_R
    assert [k for _, k in steps] == sorted((k for _, k in steps), reverse=True)
    assert steps[-1][1] == sum(ranks.values())
    # The adapter monitor reads AdaLoRA's layers too (B·diag(E)·A).
    spectra = [r["adapter"] for r in logged if "adapter" in r]
    assert spectra and all(set(s) == {"q_proj", "v_proj"} for s in spectra)


def test_a_killed_run_resumes_bitwise(prepared, trained, tmp_path, monkeypatch):
    """Interrupted after the checkpoint at step 5 (mid-pruning), resumed: the allocator's
    state comes back with it, so the adapter and its ranks equal the uninterrupted run's.
    (Long importance averages, beta 0.95: resumed without them, this run prunes otherwise.)"""
    class Interrupted(Exception):
        pass

    step = loop.GuardedTrainer.training_step

    def interrupt_at_8(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 7:
            raise Interrupted
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(loop.GuardedTrainer, "training_step", interrupt_at_8)
    with pytest.raises(Interrupted):
        train(prepared, tmp_path)
    saved = list((tmp_path / "checkpoints").glob("*/checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-5"]
    assert (saved[0] / adalora.STATE).is_file()
    monkeypatch.undo()

    summary = train(prepared, tmp_path)
    assert summary["resumed_from"] == str(saved[0])
    want = load_file(trained["adapter"] / "adapter_model.safetensors")
    got = load_file(tmp_path / "qlora/adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert (tmp_path / "qlora/rank_pattern.json").read_text() == \
        (trained["adapter"] / "rank_pattern.json").read_text()


# ---- the gradient guard ----------------------------------------------------------------------

def test_gradient_guard_rule(tiny_tokenizer):
    """E = 0 at step 1: A and B get no gradient and pass; a pruned triplet passes without
    any; a kept triplet's E, and a live triplet's row of A, without a gradient fail."""
    model = lora.inject(build_model(len(tiny_tokenizer)), ada_cfg(orth_reg_weight=0), False,
                        total_steps=STEPS)
    ids = torch.arange(1, 9).view(1, -1)

    def backward():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()

    backward()
    assert gradient_guard.missing_gradients(model) == []
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    e, a = (dict(model.named_parameters())[f"{name}.{p}.default"] for p in ("lora_E", "lora_A"))
    pattern = {n.removeprefix("base_model.model."): [True] * INIT_R
               for n, _ in model.named_parameters() if ".lora_E." in n}
    pattern[f"{name.removeprefix('base_model.model.')}.lora_E.default"][1] = False
    model.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_E." in n:
                p.fill_(0.5)
        e[1] = 0.0  # pruned, as PEFT masks it
    backward()
    e.grad[1], a.grad[1] = 0.0, 0.0  # a pruned triplet: nothing needed
    assert gradient_guard.missing_gradients(model) == []
    e.grad[2], a.grad[3] = 0.0, 0.0
    assert gradient_guard.missing_gradients(model) == [f"{name}.lora_E.default[2]",
                                                       f"{name}.lora_A.default[3]"]


def test_compression_writes_the_best_plain_lora_of_the_adalora_update(trained, tmp_path):
    from qlora_pipeline.analysis import compress
    from qlora_pipeline.models.adapter_file import read_adapter

    compress.compress(trained["adapter"], tmp_path, {"rank": 1})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1 and "init_r" not in config
    source, cut = read_adapter(trained["adapter"]), read_adapter(tmp_path)
    for key, update in source.items():
        U, S, Vh = torch.linalg.svd(update.delta().double())
        best = (U[:, :1] * S[:1]) @ Vh[:1]
        torch.testing.assert_close(cut[key].delta().double(), best, rtol=0, atol=1e-5)


def test_validation_loss_leaves_out_the_orthogonality_penalty(tiny_tokenizer):
    """PEFT adds orth_reg_weight·‖AAᵀ − I‖ (and B's) to the loss; evaluation reports the
    task's loss alone: with E = 0 (no update yet), the base model's cross-entropy."""
    base = build_model(len(tiny_tokenizer))
    ids = torch.arange(1, 9).view(1, -1)
    with torch.no_grad():
        plain = float(base(input_ids=ids, labels=ids).loss)
        model = lora.inject(base, ada_cfg(), False, total_steps=STEPS)
        penalised = float(model(input_ids=ids, labels=ids).loss)
        with adalora.task_loss_only(model):
            assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(plain, abs=1e-6)
    assert penalised > plain + 0.1
    assert model.peft_config["default"].orth_reg_weight == 0.5  # restored


def test_validation_loss_before_training_is_the_base_s_as_for_lora(prepared, trained, tmp_path):
    """E = 0 and B = 0: both start from the base, so their losses before training agree (a
    penalised AdaLoRA loss would be ~1 higher)."""
    cfg = {**task_blocks()["train"], "max_steps": 1, "eval_steps": 1, "batch_size": 8}
    plain = stage("train_qlora")(quantized=prepared["quant"], tokenized=prepared["tokenized"],
                                 adapter=tmp_path / "qlora", lora=task_blocks()["lora"],
                                 train=cfg, seed=0, checkpoints=tmp_path / "checkpoints")
    assert trained["summary"]["eval_loss_initial"] == pytest.approx(plain["eval_loss_initial"],
                                                                    abs=1e-6)


def test_saved_update_equals_peft_s_on_a_model_with_biases(tiny_tokenizer, tmp_path):
    """GPT-NeoX (biases, query_key_value/dense names): the saved, pruned adapter read back
    (adapter_file) gives PEFT's own ΔW of the reloaded model, layer by layer."""
    from peft import PeftModel

    from qlora_pipeline.models.adapter_file import read_adapter

    cfg = {**ada_cfg(), "target_modules": ["query_key_value", "dense"]}
    pruned_adalora(lora.inject(build_model(len(tiny_tokenizer), arch="gpt_neox"), cfg, False,
                               total_steps=STEPS)).save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_model(len(tiny_tokenizer), arch="gpt_neox"),
                                         tmp_path)
    updates = read_adapter(tmp_path)
    assert len(updates) == 4
    ranks = {key: update.A.shape[0] for key, update in updates.items()}
    assert set(ranks.values()) != {INIT_R}  # really pruned
    for name, module in reloaded.base_model.model.named_modules():
        if hasattr(module, "lora_E"):
            torch.testing.assert_close(updates[f"{name}.weight"].delta(),
                                       module.get_delta_weight("default"), rtol=0, atol=1e-7)
