"""LoftQ and PiSSA initialisation (training/init.py) on tiny models of two architectures (Llama;
GPT-NeoX: biases, other module names): LoftQ's factors leave exactly the Eckart–Young tail of
the quantization error on NF4 and HQQ 3-bit, and a wrong scale is caught at run time; PiSSA's
residual plus s·BA is W, reruns are bitwise, and the saved initial adapter loads as it is."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import job_policy
from qlora_pipeline.config import quantization as quant_settings
from qlora_pipeline.config.schema import load_schema, validate
from qlora_pipeline.core.errors import InputError, NumericsError
from qlora_pipeline.models import methods
from qlora_pipeline.models import quantization as quant
from qlora_pipeline.models.checkpoint import Checkpoint
from qlora_pipeline.training import init, lora

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
METHODS = {"nf4": {"method": "nf4"}, "hqq3": {"method": "hqq", "bits": 3}}


def settled(name: str) -> dict:
    return quant_settings.settle({**METHODS[name], "compute_dtype": "auto",
                                  "skip_modules": ["lm_head"]}, "quantization")


def lora_block(**keys) -> dict:
    """A lora block as the config settles it (an init's own block filled by the schema)."""
    lora = {"target_modules": "all-linear", "r": 4, **keys}
    return validate(lora, load_schema("task.schema.yaml")["properties"]["lora"], "test")


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def base(request, tmp_path_factory, tiny_tokenizer):
    from benchmarks.tiny_models import save_model

    return save_model(tmp_path_factory.mktemp(f"init-{request.param}") / "base",
                      tiny_tokenizer, request.param)


def loftq_model(base, name: str, cfg: dict):
    model = quant.quantize(base, settled(name), job_policy())
    return lora.inject(model, cfg, gradient_checkpointing=False)


@pytest.mark.parametrize("name", list(METHODS))
def test_loftq_leaves_the_eckart_young_tail_of_the_quantization_error(base, name):
    # a rank per layer (rank_pattern) and rsLoRA's scale: both reach the factors
    first = "0.mlp.down_proj" if "llama" in str(base) else "0.mlp.dense_4h_to_h"
    cfg = lora_block(use_rslora=True, rank_pattern={first: 2})
    model = loftq_model(base, name, cfg)
    checked = init.apply_loftq(model, Checkpoint(base), cfg)
    layers = init.lora_layers(model)
    assert checked["layers"] == len(layers) > 0 and checked["largest_gap"] <= init.TOLERANCE
    for layer, module in layers:
        quantized = module.get_base_layer()
        error = Checkpoint(base).weight(f"{layer}.weight").float() - \
            methods.of_layer(quantized).dequantized(quantized).float()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        r = 2 if layer.endswith(first) else 4
        assert a.shape[0] == b.shape[1] == r, layer
        left = float((error - module.scaling["default"] * (b @ a)).norm())
        tail = float(torch.linalg.svdvals(error)[r:].square().sum().sqrt())
        assert module.scaling["default"] == pytest.approx(16 / r ** 0.5)
        assert left == pytest.approx(tail, rel=1e-4) and left < float(error.norm()), layer


def test_loftq_refuses_factors_that_leave_more_than_the_tail(base, monkeypatch):
    cfg = lora_block()
    model = loftq_model(base, "nf4", cfg)
    monkeypatch.setattr(init, "scale", lambda cfg, rank: 2 * cfg["alpha"] / rank)  # wrong s
    with pytest.raises(NumericsError, match=r"LoftQ: .* in \d+ layer\(s\): .*layers\.0\."):
        init.apply_loftq(model, Checkpoint(base), cfg)


def test_loftq_residual_alternates_from_w(base):
    weight = Checkpoint(base).weight(next(k for k in Checkpoint(base).ordered_keys()
                                          if k.endswith("layers.0.mlp.down_proj.weight")
                                          or k.endswith("layers.0.mlp.dense_4h_to_h.weight")))
    method = methods.of("hqq")

    def quantize(w):
        return method.quantize_tensor(w, settled("hqq3"), job_policy())

    assert torch.equal(init.loftq_residual(weight, quantize, 4, 4.0, 1), weight.float())
    residual = init.loftq_residual(weight, quantize, 4, 4.0, 2)
    a, b, _ = init.svd_factors(weight.float() - quantize(weight).float(), 4, 4.0)
    assert torch.allclose(residual, weight.float() - 4.0 * (b @ a), atol=1e-6)
    assert torch.linalg.matrix_rank(weight.float() - residual) == 4


def pissa_run(base, cfg, seed=0):
    model = quant.load_full_precision(base, job_policy())
    return init.pissa(model, cfg, seed)


@pytest.mark.parametrize("niter", [4, 0])
def test_pissa_residual_plus_update_is_w_and_reruns_are_bitwise(base, tmp_path, niter):
    cfg = lora_block(init="pissa", pissa={"niter": niter})
    first, checked = pissa_run(base, cfg)
    assert checked["largest_gap"] <= init.TOLERANCE
    for layer, module in init.lora_layers(first):
        original = Checkpoint(base).weight(f"{layer}.weight").float()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        residual = module.get_base_layer().weight.float()
        assert not torch.allclose(residual, original)  # the top directions moved to A, B
        assert torch.allclose(residual + module.scaling["default"] * (b @ a), original,
                              atol=1e-5), layer
    second, _ = pissa_run(base, cfg)
    for model, out in ((first, tmp_path / "one"), (second, tmp_path / "two")):
        init.save_initial(model, out)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for file in names:  # identical bytes
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
    saved = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True  # loading it must not run PiSSA again


def test_pissa_initial_adapter_on_its_residual_is_the_base(base, tmp_path):
    from peft import PeftModel

    cfg = lora_block(init="pissa")
    model, _ = pissa_run(base, cfg)
    init.save_initial(model, tmp_path / "initial")
    residual = model.unload()  # the base with each adapted layer's residual
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(residual, tmp_path / "initial").eval()
        expected = quant.load_full_precision(base, job_policy()).eval()
        assert torch.allclose(loaded(input_ids=IDS).logits, expected(input_ids=IDS).logits,
                              atol=1e-4)


def test_an_inits_block_is_filled_for_that_init_only_and_dora_is_refused_with_it():
    task = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                            "num_examples": 80}}
    schema = load_schema("task.schema.yaml")
    assert not {"loftq", "pissa"} & set(validate(dict(task), schema, "t")["lora"])  # as before
    assert validate({**task, "lora": {"init": "loftq"}}, schema, "t")["lora"]["loftq"] == \
        {"iterations": 1}
    assert validate({**task, "lora": {"init": "pissa"}}, schema, "t")["lora"]["pissa"] == \
        {"niter": 4}
    for name in ("loftq", "pissa"):
        with pytest.raises(InputError, match=f"key 'lora.use_dora': found true, expected one "
                                             f"of False when lora.init is {name}"):
            validate({**task, "lora": {"init": name, "use_dora": True}}, schema, "t")
