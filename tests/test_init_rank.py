"""The report's Initialisation and rank section and its Rank selection section, on handmade
adapter, analysis and score folders laid out as the pipeline lays them out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import spearmanr

from conftest import stage
from qlora_pipeline.analysis import profile
from qlora_pipeline.core.files import write_json
from qlora_pipeline.report import init_rank, rank_selection
from qlora_pipeline.report.sections import FILES

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": None,
        "init": True, "type": "lora"}
# training: (its lora block's changes, eval_loss_initial, QLoRA score, recovered score or None)
TRAININGS = {
    "own": ({}, 3.0, 0.5, 0.6),
    "initloftq": ({"init": "loftq", "loftq": {"iterations": 2}}, 2.5, 0.55, None),
    "initpissa": ({"init": "pissa", "pissa": {"niter": 4}}, 2.2, 0.45, None),
    "typeadalora": ({"type": "adalora", "adalora": {"init_r": 6}}, 3.0, 0.52, None),
}
# Six layers of q_proj and v_proj: AdaLoRA's final ranks and the recommended ones (a tie in
# each, so the correlation's average ranks matter).
KEPT = {0: (1, 2), 1: (2, 2), 2: (3, 4), 3: (1, 1), 4: (4, 6), 5: (5, 6)}
RECOMMENDED = {0: (1, 1), 1: (1, 3), 2: (2, 3), 3: (2, 2), 4: (3, 4), 5: (4, 4)}


def layer(index: int, module: str) -> str:
    return f"model.layers.{index}.self_attn.{module}"


def score(root, task: str, variant: str, value: float):
    path = root / "eval" / variant / task / "results.json"
    write_json(path, {"results": {f"qlora_{task}": {"exact_match,strip": value,
                                                    "exact_match_stderr,strip": 0.05}},
                      "variant": variant, "task": task})
    return path


def make_table(root, task: str = "t") -> dict:
    """{"rows": ...} as rules/common.smk's init_rank_table gives it, every file written."""
    rows = {}
    for training, (changes, initial, qlora, recovered) in TRAININGS.items():
        name = "qlora" + ("" if training == "own" else f"@{training}")
        adapter = root / "adapters" / task / name
        write_json(adapter / "summary.json", {
            "eval_loss_initial": initial, "eval_loss_best": initial / 2, "train_seconds": 10.0,
            "trainable_params": 4000 + (24 if training == "typeadalora" else 0)})
        results = {"qlora": score(root, task, name, qlora)}
        if recovered is not None:
            results["recovered"] = score(root, task, name.replace("qlora", "recovered"),
                                         recovered)
        analysis = root / "analysis" / task / name
        write_json(analysis / "summary.json", {"recommendation": {"energy": 0.9, "per_layer": {
            layer(i, m): ranks[j] for i, ranks in RECOMMENDED.items()
            for j, m in enumerate(("q_proj", "v_proj"))}}})
        rows[training] = {"lora": {**LORA, **changes}, "adapter": str(adapter),
                          "analysis": str(analysis),
                          "results": {v: str(p) for v, p in results.items()}}
    # AdaLoRA's ranks as PEFT names its modules (the saved-name prefix).
    write_json(root / "adapters" / task / "qlora@typeadalora" / "rank_pattern.json", {
        "budget": 48, "ranks": {f"base_model.model.{layer(i, m)}": ranks[j]
                                for i, ranks in KEPT.items()
                                for j, m in enumerate(("q_proj", "v_proj"))}})
    return {"rows": rows}


def test_a_training_is_changed_only_off_the_default_init_and_type():
    assert not init_rank.changed(LORA)
    assert not init_rank.changed({"r": 8})  # a block from before init and type existed
    assert init_rank.changed({**LORA, "init": "gaussian"})
    assert init_rank.changed({**LORA, "type": "adalora"})


def test_rows_give_each_training_its_settings_losses_and_scores(tmp_path):
    frame = init_rank.rows([], {"t": make_table(tmp_path)})
    assert frame[["training", "init", "type", "r", "eval_loss_initial", "eval_loss_best",
                  "score", "stderr", "trainable_params"]].values.tolist() == [
        ["own", "true", "lora", 4, 3.0, 1.5, 0.5, 0.05, 4000],
        ["initloftq", "loftq (iterations 2)", "lora", 4, 2.5, 1.25, 0.55, 0.05, 4000],
        ["initpissa", "pissa (niter 4)", "lora", 4, 2.2, 1.1, 0.45, 0.05, 4000],
        ["typeadalora", "true", "adalora (init_r 6)", 4, 3.0, 1.5, 0.52, 0.05, 4024]]
    # recovery beside them where the training is recovered (the task's own here)
    assert frame["score_recovered"].tolist()[0] == 0.6
    assert frame["score_recovered"].isna().tolist() == [False, True, True, True]


def test_pairs_take_the_task_s_own_plain_lora_else_a_point_of_the_same_r():
    def rows(**lora):
        return {training: {"lora": {**LORA, **changes}} for training, changes in lora.items()}

    adalora = {"type": "adalora"}
    assert rank_selection.pairs(rows(own={"r": 8}, a=adalora, b={})) == [("a", "own")]
    # the own training is LoftQ's: the first plain point of the AdaLoRA's r
    assert rank_selection.pairs(rows(own={"init": "loftq"}, a=adalora, b={"r": 8}, c={})) == [
        ("a", "c")]
    # not the same layers: nothing to compare
    assert rank_selection.pairs(rows(own={"target_modules": ["q_proj"]}, a=adalora)) == []


def test_layer_ranks_join_both_namings_by_depth_third_and_correlate_as_scipy(tmp_path):
    table = make_table(tmp_path)["rows"]
    ranks = rank_selection.layer_ranks(tmp_path / "adapters/t/qlora@typeadalora",
                                       tmp_path / "analysis/t/qlora")
    q = ranks[ranks["module"] == "q_proj"]
    assert q["depth"].tolist() == ["shallow"] * 2 + ["middle"] * 2 + ["deep"] * 2
    assert q["adalora_rank"].tolist() == [KEPT[i][0] for i in range(6)]
    assert q["recommended_rank"].tolist() == [RECOMMENDED[i][0] for i in range(6)]
    expected = spearmanr(ranks["adalora_rank"], ranks["recommended_rank"]).statistic
    assert rank_selection.spearman(ranks) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1

    write_json(tmp_path / "elsewhere/summary.json", {"recommendation": {"per_layer": {
        "model.layers.0.mlp.up_proj": 2}}})
    with pytest.raises(ValueError, match=r"rank_pattern.json: no layer in common with .*"
                                         r"elsewhere/summary.json"):
        rank_selection.layer_ranks(Path(table["typeadalora"]["adapter"]),
                                   tmp_path / "elsewhere")


def test_depth_thirds_are_the_analysis_s():
    assert all(rank_selection.depth_band(i, n) == profile.depth_band(i, n)
               for n in range(1, 40) for i in range(n))


def test_report_gets_both_sections_with_their_files(tmp_path):
    import matplotlib.image

    table = make_table(tmp_path / "results")
    files = [f for row in table["rows"].values()
             for f in (row["adapter"], row["analysis"], *row["results"].values())]
    out = tmp_path / "report"
    names = ("markdown", "init_rank", "init_rank_plot", "rank_selection", "rank_selection_plot")
    outputs = {name: out / FILES[name][0] for name in names}
    stage("report")(files=files, sections={"init_rank": files, "rank_selection": files},
                    tables={"init_rank": {"t": table}, "rank_selection": {"t": table}},
                    **outputs, provenance=out / "provenance.json")

    text = outputs["markdown"].read_text()
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        "# Fine-tuning report", "## Initialisation and rank", "### t", "## Rank selection",
        "### t: AdaLoRA typeadalora against the recommendation for own (energy 0.9)"]
    own, = [line for line in text.splitlines() if line.startswith("| own ")]
    assert [c.strip() for c in own.strip("|").split("|")][-2:] == ["0.6", "0.05"]
    loftq, = [line for line in text.splitlines() if line.startswith("| initloftq ")]
    assert "nan" not in loftq  # no recovered score: left empty
    assert pd.read_csv(outputs["init_rank"])["training"].tolist() == list(TRAININGS)
    layers = pd.read_csv(outputs["rank_selection"])
    assert len(layers) == 12 and set(layers["lora"]) == {"own"}
    rho = rank_selection.spearman(layers)
    assert f"Budget 48, ranks kept {sum(map(sum, KEPT.values()))} over 12 layers; " \
           f"Spearman's ρ = {rho:.3f}." in text
    # q_proj of the deepest third: layers 4 and 5, AdaLoRA 4 and 5, recommended 3 and 4
    assert "| q_proj   | deep    |        2 |            4.5 |                3.5 |" in text
    for plot in ("init_rank_plot", "rank_selection_plot"):
        assert matplotlib.image.imread(outputs[plot]).shape[0] > 0

