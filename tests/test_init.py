"""LoftQ and PiSSA initialisation (training/init.py) on tiny models of two architectures (Llama;
GPT-NeoX: biases, other module names): LoftQ's factors leave exactly the Eckart–Young tail of
the quantization error on NF4 and HQQ 3-bit, and a wrong scale is caught at run time; PiSSA's
residual plus s·BA is W, reruns are bitwise, and the saved initial adapter loads as it is."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import job_policy, stage
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


def test_a_training_base_carries_the_initial_adapter_that_corrects_its_error(base, tmp_path):
    """LoftQ with two steps on HQQ 3-bit (rule quantize_for_training): the base quantizes
    R = W − s·BA, not W, and the initial adapter it carries, loaded for training, leaves the
    Eckart–Young tail of W − deq(Q(R))."""
    from qlora_pipeline.config import trainings

    cfg = lora_block(init="loftq", loftq={"iterations": 2})
    own = tmp_path / "own"
    stage("quantize_for_training")(base=base, quantized=own, quantization=settled("hqq3"),
                                   lora=trainings.base_settings(cfg), seed=0)
    saved = json.loads((own / "quantization.json").read_text())["initialisation"]
    assert saved["layers"] > 0 and saved["largest_gap"] <= init.TOLERANCE
    model, expected = init.prepare(own, cfg, job_policy(), False)
    assert lora.verify_frozen(model, expected)["trainable_params"] == expected > 0
    shared = methods.of("hqq")
    for layer, module in init.lora_layers(model):
        quantized = module.get_base_layer()
        weight = Checkpoint(base).weight(f"{layer}.weight")
        deq = shared.dequantized(quantized).float()
        assert not torch.equal(deq, shared.quantize_tensor(weight, settled("hqq3"), job_policy()))
        error = weight.float() - deq
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        left = float((error - module.scaling["default"] * (b @ a)).norm())
        assert left == pytest.approx(float(torch.linalg.svdvals(error)[4:].square().sum()
                                           .sqrt()), rel=1e-4), layer


def test_the_converted_adapter_on_the_original_base_is_the_trained_model(base, tmp_path):
    """PiSSA's A, B moved as a training moves them: the converted adapter (rank 2r, PEFT's
    conversion) on the original W computes what the trained adapter does on its residual."""
    from peft import PeftModel

    model, _ = pissa_run(base, lora_block(init="pissa"))
    init.save_initial(model, tmp_path / "initial")
    start = {name: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone())
             for name, m in init.lora_layers(model)}
    torch.manual_seed(1)
    with torch.no_grad():
        for _, module in init.lora_layers(model):
            for param in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                param.add_(0.05 * torch.randn_like(param))
        trained = model.eval()(input_ids=IDS).logits
    init.save_converted(model, tmp_path)
    saved = json.loads((tmp_path / "converted/adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    with torch.no_grad():
        original = quant.load_full_precision(base, job_policy()).eval()
        before = original(input_ids=IDS).logits
        converted = PeftModel.from_pretrained(original, tmp_path / "converted")
        assert torch.allclose(converted(input_ids=IDS).logits, trained, atol=1e-4)
    assert not torch.allclose(before, trained, atol=1e-2)  # the training moved the model
    # The analysis reports what training learned, s·(BA − B₀A₀), beside the whole s·BA.
    model.save_pretrained(tmp_path)
    settings = {"energy": 0.9, "saturation": 0.95, "intruders": {"enabled": False}}
    stage("analyze_adapter")(adapter=tmp_path, base=base, analysis=tmp_path / "analysis",
                             settings=settings, task="t", name="qlora@pissa")
    summary = json.loads((tmp_path / "analysis/summary.json").read_text())
    learned = json.loads((tmp_path / "analysis/layers_learned.json").read_text())
    assert summary["learned"]["r"] == 8 and summary["update"].startswith("whole")
    for name, module in init.lora_layers(model):
        (a0, b0), a, b = start[name], module.lora_A["default"].weight, \
            module.lora_B["default"].weight
        step = module.scaling["default"] * (b @ a - b0 @ a0)
        key = name.removeprefix("base_model.model.") + ".weight"
        assert learned[key]["fro"] == pytest.approx(float(step.norm()), rel=1e-4), key
    # Compression cuts the whole adapter and reports its learned update's cut beside it.
    stage("compress_adapter")(adapter=tmp_path, compressed=tmp_path / "compressed",
                              settings={"energy": 0.9}, task="t")
    cut = json.loads((tmp_path / "compressed/compression.json").read_text())
    assert (cut["rank_before"], cut["learned"]["rank_before"]) == (4, 8)
    assert cut["learned"]["parameters"]["before"] == 2 * cut["parameters"]["before"]


def test_rows_that_would_build_the_same_base_share_its_id():
    from qlora_pipeline.config import trainings

    quantization = settled("nf4")

    def row(seed=0, lr=1e-3, **keys):
        return {"lora": lora_block(**keys), "seed": seed, "train": {"learning_rate": lr}}

    rows = trainings.with_bases({
        "own": row(), "true": row(init=True), "loftq1": row(init="loftq"),
        "pissa": row(init="pissa"), "pissa-lr": row(init="pissa", lr=5e-3),
        "pissa-r2": row(init="pissa", r=2), "pissa-s1": row(init="pissa", seed=1),
        "loftq2": row(init="loftq", loftq={"iterations": 2})}, quantization)
    assert rows["own"]["base"] is rows["true"]["base"] is rows["loftq1"]["base"] is None
    assert rows["pissa"]["base"] == rows["pissa-lr"]["base"]  # the learning rate builds nothing
    assert rows["pissa"]["base"].startswith("pissa-") and rows["loftq2"]["base"].startswith(
        "loftq-")
    assert len({rows[k]["base"] for k in ("pissa", "pissa-r2", "pissa-s1", "loftq2")}) == 4
    other = trainings.with_bases({"p": row(init="pissa")}, settled("hqq3"))
    assert other["p"]["base"] != rows["pissa"]["base"]  # another quantization, another base
    assert trainings.bases(rows) == {rows["pissa"]["base"]: rows["pissa"],
                                     rows["pissa-r2"]["base"]: rows["pissa-r2"],
                                     rows["pissa-s1"]["base"]: rows["pissa-s1"],
                                     rows["loftq2"]["base"]: rows["loftq2"]}
