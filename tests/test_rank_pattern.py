"""lora.rank_pattern: PEFT's per-layer ranks, from the task config to the adapter's shapes and
the verified trainable-parameter count."""

from __future__ import annotations

import copy

import pytest
from conftest import build_model, job_policy, task_blocks, write_yaml

from qlora_pipeline.config import load_config
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.training import lora

# The tiny Llama: hidden 64, 4 heads, 2 KV heads, so q_proj is 64x64 and v_proj 64->32.
TASK = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                      "num_examples": 20}}


def lora_cfg(**overrides) -> dict:
    return {**task_blocks()["lora"], **overrides}


@pytest.fixture
def model(tiny_tokenizer):
    """A float tiny model: enough for PEFT's injection and our checks (no quantized base)."""
    return build_model(len(tiny_tokenizer))


def lora_a_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """{base module name: shape of its lora_A weight}."""
    prefix, suffix = "base_model.model.", ".lora_A.default.weight"
    return {n[len(prefix):-len(suffix)]: tuple(p.shape) for n, p in peft_model.named_parameters()
            if n.endswith(suffix)}


def test_module_path_key_sets_that_layers_rank_and_the_count_stays_exact(model):
    cfg = lora_cfg(r=8, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    expected = lora.expected_trainable(model, cfg)
    peft_model = lora.inject(model, cfg, False)
    assert lora_a_shapes(peft_model) == {
        "model.layers.0.self_attn.q_proj": (2, 64), "model.layers.0.self_attn.v_proj": (8, 64),
        "model.layers.1.self_attn.q_proj": (8, 64), "model.layers.1.self_attn.v_proj": (8, 64)}
    # By hand: q_proj 64+64, v_proj 64+32 per unit of rank.
    assert expected == 2 * 128 + 8 * 128 + 8 * 96 * 2
    assert lora.verify_frozen(peft_model, expected)["trainable_params"] == expected


def test_suffix_key_applies_to_every_matching_layer(model):
    cfg = lora_cfg(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4})
    expected = lora.expected_trainable(model, cfg)
    peft_model = lora.inject(model, cfg, False)
    shapes = lora_a_shapes(peft_model)
    assert {n: s for n, s in shapes.items() if n.endswith("q_proj")} == {
        "model.layers.0.self_attn.q_proj": (4, 64), "model.layers.1.self_attn.q_proj": (4, 64)}
    assert {s for n, s in shapes.items() if n.endswith("v_proj")} == {(8, 64)}
    assert expected == 2 * (4 * 128 + 8 * 96)
    assert lora.verify_frozen(peft_model, expected)["trainable_params"] == expected


def test_rank_pattern_with_dora_and_layers_to_transform_counts_exactly(model):
    cfg = lora_cfg(r=8, use_dora=True, layers_to_transform=[1],
                   rank_pattern={"layers.1.self_attn.v_proj": 3})
    expected = lora.expected_trainable(model, cfg)
    peft_model = lora.inject(model, cfg, False)
    assert lora_a_shapes(peft_model) == {"model.layers.1.self_attn.q_proj": (8, 64),
                                         "model.layers.1.self_attn.v_proj": (3, 64)}
    assert expected == 8 * 128 + 64 + 3 * 96 + 32
    assert lora.verify_frozen(peft_model, expected)["trainable_params"] == expected


@pytest.mark.parametrize("overrides, key", [
    ({"rank_pattern": {"model.layers.0.self_attn.k_proj": 2}}, "model.layers.0.self_attn.k_proj"),
    ({"rank_pattern": {"gate_proj": 2}}, "gate_proj"),
    ({"rank_pattern": {"model.layers.0.self_attn.q_proj": 2}, "layers_to_transform": [1]},
     "model.layers.0.self_attn.q_proj"),
    ({"rank_pattern": {"layers.7.self_attn.q_proj": 2}}, "layers.7.self_attn.q_proj"),
], ids=["untargeted-module", "untargeted-suffix", "outside-layers", "no-such-layer"])
def test_key_matching_no_targeted_layer_is_refused(model, overrides, key):
    with pytest.raises(InputError) as info:
        lora.inject(model, lora_cfg(**overrides), False)
    message = str(info.value)
    assert "lora.rank_pattern" in message and f"'{key}'" in message
    assert "\n" not in message


def test_rank_above_a_matched_layers_smallest_dimension_is_refused(model):
    lora.check(model, lora_cfg(rank_pattern={"v_proj": 32}))  # v_proj: 64 -> 32
    lora.check(model, lora_cfg(rank_pattern={"q_proj": 64}))  # q_proj: 64x64
    with pytest.raises(InputError, match=r"lora\.rank_pattern: key 'v_proj': found rank 33, "
                                         r"expected at most 32 .*v_proj"):
        lora.check(model, lora_cfg(rank_pattern={"v_proj": 33}))
    with pytest.raises(InputError, match=r"key 'model\.layers\.1\.self_attn\.q_proj': found "
                                         r"rank 65, expected at most 64"):
        lora.check(model, lora_cfg(rank_pattern={"model.layers.1.self_attn.q_proj": 65}))


def test_r_is_bounded_only_by_the_layers_that_use_it(model):
    # Every v_proj (32 outputs) has its own rank, so r may go up to q_proj's 64.
    lora.check(model, lora_cfg(r=64, rank_pattern={"v_proj": 8}))
    with pytest.raises(InputError, match=r"lora\.r: found 40, expected at most 32"):
        lora.check(model, lora_cfg(r=40, rank_pattern={"model.layers.0.self_attn.v_proj": 8}))


def test_bad_regex_and_conflicting_keys_are_refused(model):
    with pytest.raises(InputError, match=r"lora\.rank_pattern: key 'q_proj\(': .*regular"):
        lora.check(model, lora_cfg(rank_pattern={"q_proj(": 2}))
    with pytest.raises(InputError, match=r"lora\.rank_pattern: keys .* all match "
                                         r"model\.layers\.0\.self_attn\.q_proj"):
        lora.check(model, lora_cfg(rank_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 2}))
    lora.check(model, lora_cfg(rank_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 4}))


def test_recovery_counts_a_saved_adapters_rank_pattern(tiny_model_dir, tmp_path):
    """prepare_recovery reads the adapter's rank_pattern back for its expected count."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = lora_cfg(rank_pattern={"model.layers.1.self_attn.v_proj": 2})
    lora.inject(base, cfg, False).save_pretrained(tmp_path / "adapter")
    model, expected = lora.prepare_recovery(tiny_model_dir, tmp_path / "adapter", job_policy(),
                                            False)
    assert expected == 8 * 128 * 2 + 8 * 96 + 2 * 96
    assert lora.verify_frozen(model, expected)["trainable_params"] == expected


# ---- the schema ------------------------------------------------------------------------------

def load_task(tmp_path, lora_block: dict) -> dict:
    write_yaml(tmp_path / "config/tasks/arithmetic.yaml", {**copy.deepcopy(TASK),
                                                           "lora": lora_block})
    config = {"tasks": ["arithmetic"], "base_model": {"source": "local", "path": "/models/tiny"}}
    return load_config(config, root=tmp_path)[1]["arithmetic"]


def test_schema_default_is_empty(tmp_path):
    assert load_task(tmp_path, {})["lora"]["rank_pattern"] == {}


def test_schema_accepts_a_pasted_recommendation(tmp_path, model):
    task = load_task(tmp_path, {"r": 4, "rank_pattern": {"model.layers.1.self_attn.q_proj": 2,
                                                         "v_proj": 6}})
    assert task["lora"]["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2, "v_proj": 6}
    expected = lora.expected_trainable(model, task["lora"])
    peft_model = lora.inject(model, task["lora"], False)
    assert lora_a_shapes(peft_model)["model.layers.1.self_attn.q_proj"] == (2, 64)
    assert lora_a_shapes(peft_model)["model.layers.0.self_attn.q_proj"] == (4, 64)
    assert lora_a_shapes(peft_model)["model.layers.0.self_attn.v_proj"] == (6, 64)
    assert expected == 4 * 128 + 2 * 128 + 2 * 6 * 96
    assert lora.verify_frozen(peft_model, expected)["trainable_params"] == expected


@pytest.mark.parametrize("rank, expected", [
    (0, "expected a number >= 1"),
    (2.5, "expected a value of type integer"),
    ("2", "expected a value of type integer"),
], ids=["zero", "float", "string"])
def test_schema_rejects_a_bad_rank(tmp_path, rank, expected):
    with pytest.raises(InputError) as info:
        load_task(tmp_path, {"rank_pattern": {"q_proj": rank}})
    message = str(info.value)
    assert "lora.rank_pattern.q_proj" in message and expected in message


def test_schema_rejects_a_non_mapping(tmp_path):
    with pytest.raises(InputError, match=r"lora\.rank_pattern.*expected a value of type object"):
        load_task(tmp_path, {"rank_pattern": ["q_proj"]})
