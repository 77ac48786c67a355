"""Adapter combinations against dense references: PEFT loads each combined adapter and its
update ΔW, layer by layer, is what the method means on the tasks' dense updates (cat and sum:
Σ wᵢΔWᵢ; svd: its best rank-k cut; ties/magnitude: PEFT's rule on the dense updates, cut),
for adapters of different ranks, targets and rsLoRA, on two architectures. What cannot be
combined exactly is refused, each case by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model

from qlora_pipeline.config import combinations
from qlora_pipeline.analysis import combine as combine_module
from qlora_pipeline.analysis.combine import combine
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.core.errors import NumericsError

# Two tasks' adapters that differ in everything PEFT's add_weighted_adapter gets wrong or
# refuses: ranks, targets (a layer only one adapts) and rsLoRA scaling.
SOURCES = {"one": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "two": {"r": 6, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True}}


def spec(method: str, weights=(1.0, 1.0), density=None, svd_rank=None) -> dict:
    return {"name": "c", "method": method, "weights": list(weights), "density": density,
            "svd_rank": svd_rank}


def save_adapter(path, model, name: str, arch: str, seed: int, **overrides):
    """A saved adapter with random nonzero A and B (a trained-looking update)."""
    from peft import LoraConfig, get_peft_model

    settings = {**SOURCES[name], **overrides}
    if arch == "gpt_neox" and name == "one":  # GPT-NeoX fuses q, k and v
        settings["target_modules"] = ["query_key_value"]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def sources(request, tmp_path_factory, tiny_tokenizer):
    """(arch, base model, {task: adapter dir}) for one architecture."""
    arch, root = request.param, tmp_path_factory.mktemp(f"combine-{request.param}")
    model = build_model(len(tiny_tokenizer), arch=arch)
    dirs = {name: save_adapter(root / name, model, name, arch, seed)
            for seed, name in enumerate(SOURCES)}
    return arch, model, dirs


def deltas(model, adapter_dir, name: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of every adapted layer, keyed by module path."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    found = {key.removeprefix("base_model.model."): module.get_delta_weight(name).detach()
             for key, module in peft_model.named_modules()
             if hasattr(module, "lora_A") and name in module.lora_A}
    peft_model.unload()
    return found


def weighted_sum(model, dirs, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for (name, folder), w in zip(dirs.items(), weights):
        for key, delta in deltas(model, folder, name).items():
            total[key] = total.get(key, 0) + w * delta
    return total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def combined(tmp_path, dirs, combination) -> tuple:
    out = tmp_path / combination["method"]
    out.mkdir()
    return out, combine(dirs, out, combination, seed=0)


@pytest.mark.parametrize("method, weights", [("cat", (1.0, 1.0)), ("cat", (0.7, -1.3)),
                                             ("sum", (1.0, 1.0)), ("sum", (0.5, -2.0))])
def test_exact_methods_equal_the_weighted_sum_of_updates(sources, tmp_path, method, weights):
    _, model, dirs = sources
    out, summary = combined(tmp_path, dirs, spec(method, weights))
    reference = weighted_sum(model, dirs, weights)
    got = deltas(model, out, "combined")
    assert set(got) == set(reference)  # the union of both adapters' layers, no more
    for key, delta in reference.items():
        assert relative(got[key], delta) < 1e-4, key
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == 1
    if method == "cat":  # rank Σ rᵢ where both adapt, the one adapter's elsewhere
        ranks = {r["rank"] for r in summary["per_layer"].values()}
        assert ranks == {10, 6}
    assert summary["relative_error"]["max"] < 1e-6


def test_cat_equals_both_adapters_active_at_once(sources, tmp_path):
    """Weights 1: the combination is the model with both adapters applied together."""
    from peft import PeftModel

    _, model, dirs = sources
    out, _ = combined(tmp_path, dirs, spec("cat"))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    both = PeftModel.from_pretrained(model, str(dirs["one"]), adapter_name="one")
    both.load_adapter(str(dirs["two"]), adapter_name="two")
    both.base_model.set_adapter(["one", "two"])
    with torch.no_grad():
        expected = both(ids).logits
    both.unload()
    one = PeftModel.from_pretrained(model, str(out))
    with torch.no_grad():
        got = one(ids).logits
    one.unload()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_svd_is_the_best_rank_k_cut_of_the_sum(sources, tmp_path):
    _, model, dirs = sources
    out, summary = combined(tmp_path, dirs, spec("svd", (1.0, 0.5), svd_rank=3))
    got = deltas(model, out, "combined")
    for key, delta in weighted_sum(model, dirs, (1.0, 0.5)).items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        assert relative(got[key], best) < 1e-4, key
        record = summary["per_layer"][key]
        assert record["rank"] == 3
        assert record["relative_error"] == pytest.approx(
            float((S[3:] ** 2).sum().sqrt() / S.norm()), abs=1e-5)


@pytest.mark.parametrize("method", ["ties_svd", "magnitude_prune_svd"])
def test_pruning_methods_are_peft_rules_on_dense_updates(sources, tmp_path, method):
    from peft.utils import merge_utils

    _, model, dirs = sources
    weights = (1.0, 0.8)
    out, _ = combined(tmp_path, dirs, spec(method, weights, density=0.4, svd_rank=5))
    got = deltas(model, out, "combined")
    parts = {name: deltas(model, folder, name) for name, folder in dirs.items()}
    rule = getattr(merge_utils, method.removesuffix("_svd"))
    for key, delta in got.items():
        present = [(w, parts[n][key]) for n, w in zip(dirs, weights) if key in parts[n]]
        merged = rule([d.float() for _, d in present],
                      torch.tensor([w for w, _ in present]), 0.4).double()
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        k = min(5, int((S > 1e-6 * S[0]).sum()))
        assert relative(delta, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]) < 1e-4, key


def test_dare_is_reproducible_from_the_seed(sources, tmp_path):
    _, _, dirs = sources
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        out.mkdir()
        combine(dirs, out, spec("dare_ties_svd", density=0.5), seed=3)
    name = "adapter_model.safetensors"
    assert (first / name).read_bytes() == (second / name).read_bytes()


def test_overlap_of_an_adapter_with_itself_is_one_and_with_noise_small(sources, tmp_path):
    _, _, dirs = sources
    _, same = combined(tmp_path, {"one": dirs["one"], "also": dirs["one"]}, spec("sum"))
    assert same["overlap"] and {round(r["overlap"], 6) for r in same["overlap"]} == {1.0}
    _, different = combine_into(tmp_path / "different", dirs, spec("cat"))
    for record in different["overlap"]:  # random adapters: about the random-subspace level
        assert record["overlap"] < 3 * record["random"] + 0.05


def combine_into(folder, dirs, combination) -> tuple:
    folder.mkdir()
    return folder, combine(dirs, folder, combination)


def test_a_wrong_factorisation_is_caught_before_anything_is_saved(sources, tmp_path,
                                                                   monkeypatch):
    _, _, dirs = sources
    real = combine_module.split
    monkeypatch.setattr(combine_module, "split",
                        lambda *a, **k: tuple(1.01 * t for t in real(*a, **k)))
    out = tmp_path / "bad"
    out.mkdir()
    with pytest.raises(NumericsError, match="against its definition"):
        combine(dirs, out, spec("svd"))
    assert not any(out.iterdir())


# Refusals: each case PEFT computes wrongly or this module cannot compute exactly.

def test_dora_and_bias_adapters_are_refused(tmp_path, tiny_tokenizer):
    model = build_model(len(tiny_tokenizer))
    plain = save_adapter(tmp_path / "plain", model, "one", "llama", 0)
    dora = save_adapter(tmp_path / "dora", model, "two", "llama", 1, use_dora=True)
    bias = save_adapter(tmp_path / "bias", model, "two", "llama", 2, lora_bias=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"DoRA.*#3761"):
        combine({"one": plain, "two": dora}, out, spec("cat"))
    with pytest.raises(InputError, match="lora_bias"):
        combine({"one": plain, "two": bias}, out, spec("cat"))


def test_the_stage_leaves_nothing_behind_a_refusal(tmp_path, tiny_tokenizer):
    from conftest import stage

    model = build_model(len(tiny_tokenizer))
    plain = save_adapter(tmp_path / "plain", model, "one", "llama", 0)
    dora = save_adapter(tmp_path / "dora", model, "two", "llama", 1, use_dora=True)
    out = tmp_path / "results/adapters/combined/c"
    with pytest.raises(InputError, match="DoRA"):
        stage("combine_adapters")(adapters=[plain, dora], combined=out, seed=0,
                                  combination={**spec("cat"), "tasks": ["one", "two"]})
    assert not out.exists() and not out.parent.exists()


def test_adapters_of_different_bases_or_shapes_are_refused(tmp_path, tiny_tokenizer):
    import shutil

    llama = save_adapter(tmp_path / "llama", build_model(len(tiny_tokenizer)), "one",
                         "llama", 0)
    moved = shutil.copytree(llama, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "another/model"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="different bases"):
        combine({"a": llama, "b": moved}, out, spec("cat"))
    wide = build_model(len(tiny_tokenizer))
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    narrow = save_adapter(tmp_path / "narrow", wide, "one", "llama", 2)
    with pytest.raises(InputError, match=r"model.layers.0.self_attn.q_proj.*expected one shape"):
        combine({"a": llama, "b": narrow}, out, spec("cat"))


def combination_item(**changes) -> dict:
    return {"name": "c", "tasks": ["a", "b"], "method": "cat", "weights": None,
            "density": None, "svd_rank": None, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"method": "linear"}, r"'linear' is PEFT's.*cross terms.*#3004.*expected 'sum'"),
    ({"method": "ties"}, r"expected 'ties_svd'"),
    ({"method": "average"}, r"method 'average'; expected one of cat, sum"),
    ({"weights": [1.0]}, r"1 weights for 2 tasks"),
    ({"method": "ties_svd"}, r"density None with method 'ties_svd'"),
    ({"density": 0.5}, r"density 0.5 with method 'cat'"),
    ({"svd_rank": 4}, r"svd_rank 4 with method 'cat'"),
    ({"tasks": ["a", "typo"]}, r"tasks \['typo'\] have no file in the task folder"),
])
def test_bad_combinations_are_refused_with_one_line(changes, message):
    with pytest.raises(InputError, match=message) as error:
        combinations.check([combination_item(**changes)], ["a", "b"], KNOWN)
    assert "\n" not in str(error.value) and "combinations[0]" in str(error.value)


KNOWN = ["a", "b", "c"]  # the task files


def test_names_are_unique_and_weights_default_to_one():
    check = combinations.check
    assert check([combination_item()], ["a", "b"], KNOWN)["c"]["weights"] == [1.0, 1.0]
    with pytest.raises(InputError, match="used twice"):
        check([combination_item(), combination_item()], ["a", "b"], KNOWN)
    with pytest.raises(InputError, match="a task named 'combined'"):
        check([combination_item(tasks=["a", "combined"])], ["a", "combined"], [*KNOWN, "combined"])


def test_a_combination_of_tasks_this_run_leaves_out_is_left_out(caplog):
    """`--config 'tasks=[arithmetic]'` on the default config runs without its combination."""
    import yaml
    from conftest import REPO

    from qlora_pipeline.config import load_config

    assert combinations.check([combination_item()], ["a"], KNOWN) == {}
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["tasks"] = ["arithmetic"]
    assert load_config(config, root=REPO)[0]["combinations"] == []
    assert "combinations ['arithmetic-topic'] left out" in caplog.text


# The combination through the DAG (conftest's tiny run: `both`, method sum, of the two tasks).

def test_the_tiny_run_combines_scores_and_reports_both_tasks(tiny_run):
    import pandas as pd

    from qlora_pipeline.models.adapter_file import read_adapter

    results = tiny_run / "results"
    folder = results / "adapters/combined/both"
    sources = {t: read_adapter(results / f"adapters/{t}/qlora") for t in ("arithmetic", "topic")}
    for key, update in read_adapter(folder).items():  # exactly the sum of the tasks' updates
        reference = sum(s[key].delta() for s in sources.values() if key in s)
        assert relative(update.delta(), reference) < 1e-4, key
    provenance = json.loads((folder / "provenance.json").read_text())
    assert [i["path"] for i in provenance["inputs"]["adapters"]] == [
        f"results/adapters/{t}/qlora" for t in ("arithmetic", "topic")]
    for task in ("arithmetic", "topic"):
        scored = json.loads((results / f"eval/combined+both/{task}/provenance.json").read_text())
        assert scored["inputs"]["adapter"]["path"].endswith("adapters/combined/both")
        assert scored["inputs"]["quantized"]["path"].endswith("models/quantized")

    matrix = pd.read_csv(results / "report/combinations.csv")
    assert len(matrix) == 2 * 4  # per task: the 4-bit base, its adapter, the other's, both
    for task, rows in matrix.groupby("task"):
        by = rows.set_index("adapter")
        assert by.loc[task, "kind"] == "own" and by.loc["both", "kind"] == "combined"
        base, own, both = (by.loc[a, "score"] for a in ("quantized base", task, "both"))
        assert by.loc["both", "gain"] == pytest.approx(both - base)
        if own > base:
            assert by.loc["both", "retention"] == pytest.approx((both - base) / (own - base))
        else:
            assert pd.isna(by.loc["both", "retention"])
    report = (results / "report/report.md").read_text()
    section = report.split("## Combinations\n", 1)[1].split("\n## ", 1)[0]
    assert "| task | metric | quantized base | arithmetic | topic | both |" in section
    assert "### Best method per set of tasks" in section and "arithmetic & topic" in section
    assert (results / "report/overlap.png").stat().st_size > 0


def test_the_example_config_tries_every_method():
    """config/examples/combinations.yaml, laid over config/config.yaml as --configfile lays it."""
    import yaml
    from conftest import REPO

    from qlora_pipeline.config import deep_merge, load_config

    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    example = yaml.safe_load((REPO / "config/examples/combinations.yaml").read_text())
    config, _ = load_config(deep_merge(base, example), root=REPO)
    assert {c["method"] for c in config["combinations"]} == set(combinations.METHODS)
    assert config["combinations"][0] == load_config(base, root=REPO)[0]["combinations"][0]
