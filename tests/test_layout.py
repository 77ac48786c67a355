"""One shape for every stage: rule -> the one script -> one stage function named like the rule,
whose signature names the rule's inputs and outputs; names, paths and the variant grammar
written once (qlora_pipeline/core/layout.py) and agreeing with the schema and the rules; the
library imported as an installed package, never by a path edit."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from conftest import REPO
from qlora_pipeline.core import layout
from qlora_pipeline.jobs.code_digest import stage_functions
from qlora_pipeline.jobs.runner import stage_function

RULE_FILES = {path.stem: path.read_text() for path in (REPO / "rules").glob("*.smk")}
DECLARED = {name: module for module, text in RULE_FILES.items()
            for name in re.findall(r"^rule (\w+):", text, re.M)}


def test_every_rule_runs_the_one_script_and_its_stage_function():
    assert set(DECLARED) == set(stage_functions())
    for rule, module in DECLARED.items():
        block = RULE_FILES[module].split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
        assert "script:\n        STAGE" in block, rule
        assert "conda:" in block, rule
        assert stage_function(rule).__module__ == f"qlora_pipeline.stages.{module}"
        assert f'code=code("{rule}")' in block, f"rule {rule}: no params.code"
    assert sorted(p.name for p in (REPO / "scripts").iterdir()) == ["stage.py"]


def declared(rule: str, group: str) -> set[str]:
    """The names a rule gives its inputs or outputs (`name=` lines of the group)."""
    module = DECLARED[rule]
    block = RULE_FILES[module].split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
    part = re.search(rf"^    {group}:\n(.*?)(?=^    \w+:)", block, re.M | re.S)
    return set(re.findall(r"^        (\w+)=", part.group(1), re.M)) if part else set()


def test_each_stage_names_its_rules_inputs_and_outputs():
    """The stage's signature says which arguments are inputs and outputs (jobs/runner.py reads
    it to run a stage outside Snakemake); it agrees with the rule. Rules that name them by
    input functions (unpack, **) are checked by the tiny run's provenance."""
    from qlora_pipeline.jobs.runner import argument_kinds

    for rule in stage_functions():
        kinds = argument_kinds(stage_function(rule))
        for group, kind in (("input", "Input"), ("output", "Output")):
            names = declared(rule, group) - {"provenance"}
            assert names <= {n for n, k in kinds.items() if k == kind} or "**" in kinds, \
                (rule, group, names)


def test_stage_functions_take_keywords_and_a_policy():
    for rule in stage_functions():
        params = inspect.signature(stage_function(rule)).parameters
        assert "policy" in params, rule
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params.values()), rule


def test_no_sys_path_edits():
    for path in [*(REPO / "scripts").glob("*.py"), *(REPO / "rules").glob("*.smk"),
                 *(REPO / "benchmarks").glob("*.py"), REPO / "Snakefile"]:
        assert "sys.path" not in path.read_text(), path


def test_schema_variants_are_the_layout_kinds():
    schema = yaml.safe_load((REPO / "config/schemas/config.schema.yaml").read_text())
    variants = schema["properties"]["evaluation"]["properties"]["variants"]
    assert variants["items"]["enum"] == list(layout.VARIANT_KINDS)
    assert variants["default"] == list(layout.VARIANT_KINDS)
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert set(config["evaluation"]["variants"]) <= set(layout.VARIANT_KINDS)


def test_schema_methods_are_the_method_modules():
    """A quantization method is declared by its module only (models/methods/): the schema
    lists none, and an unknown one is refused naming the modules' names."""
    from qlora_pipeline.config.quantization import settle
    from qlora_pipeline.core.errors import InputError
    from qlora_pipeline.models import methods

    schema = yaml.safe_load((REPO / "config/schemas/config.schema.yaml").read_text())
    assert "enum" not in schema["properties"]["quantization"]["properties"]["method"]
    assert list(methods.MODULES) == ["nf4", "fp4", "int8", "hqq"]
    with pytest.raises(InputError, match="found 'fp8'; expected one of nf4, fp4, int8, hqq"):
        settle({"method": "fp8"}, "quantization")


@pytest.mark.parametrize("variant, inputs", [
    ("base", {"spec", "base"}),
    ("quantized", {"spec", "base", "quantized"}),
    ("qlora", {"spec", "base", "quantized", "adapter"}),
    ("recovered", {"spec", "base", "adapter"}),
    ("merged", {"spec", "base", "merged"}),
])
def test_variant_inputs(variant, inputs):
    found = layout.variant_inputs(variant, "topic")
    assert set(found) == inputs
    assert found["spec"] == "results/eval/tasks/topic" and found["base"] == layout.base()
    if "adapter" in found:
        assert found["adapter"] == f"results/adapters/topic/{variant}"


def test_one_grammar_for_variant_names():
    """kind[+source][@training], parsed in one place (the rules, the reports, qlora-chat)."""
    Variant = layout.Variant
    assert Variant.parse("qlora+topic") == Variant("qlora", "topic")
    assert Variant.parse("qlora@r16-lr3e-4") == Variant("qlora", training="r16-lr3e-4")
    assert Variant.parse("recovered+topic@q_proj+v_proj") == \
        Variant("recovered", "topic", "q_proj+v_proj")
    assert Variant.parse("combined+both") == Variant("combined", "both")
    for name in ("qlora", "merged+topic", "qlora@r1", "recovered+t@r2-rsteps5", "combined+x"):
        found = Variant.parse(name)  # the parts give the name back
        assert found.kind + (f"+{found.source}" if found.source else "") + \
            (f"@{found.training}" if found.training else "") == name
    assert Variant.parse("recovered+t@r2").adapter_name == "recovered@r2"
    found = layout.variant_inputs("qlora+topic", "arithmetic")
    assert found["adapter"] == "results/adapters/topic/qlora"
    assert found["spec"] == "results/eval/tasks/arithmetic"
    assert layout.variant_inputs("merged+topic", "arithmetic")["merged"] == \
        "results/models/merged/topic"
    assert layout.variant_inputs("qlora@r2", "topic")["adapter"] == \
        "results/adapters/topic/qlora@r2"
    assert layout.trained_base("recovered@r2") == layout.base()
    for bad in ("fp8", "base+topic", "qlora+", "qlora+a/b", "merged@r1", "compressed@r1",
                "combined", "combined@r1", "qlora@"):
        with pytest.raises(ValueError, match="variant"):
            Variant.parse(bad)


def test_paths_follow_the_run_whenever_they_are_read():
    """use_run moves every path, also for a function imported before it was called."""
    from qlora_pipeline.core.layout import base, quantized

    try:
        layout.use_run("ablation")
        assert base() == "results/ablation/models/base"
        assert quantized() == "results/ablation/models/quantized"
        assert layout.adapter("t", "qlora@r1") == "results/ablation/adapters/t/qlora@r1"
        with pytest.raises(Exception, match="a folder every run has"):
            layout.use_run("adapters")
    finally:
        layout.use_run(None)
    assert base() == "results/models/base"


def test_cross_task_variant_is_planned_by_the_rules(workdir, run_snakemake):
    out = run_snakemake(workdir, "-n", "results/eval/qlora+topic/arithmetic/results.json").stdout
    block = out.split("rule evaluate:", 1)[1].split("\n\n", 1)[0]
    assert "results/adapters/topic/qlora" in block and "results/eval/tasks/arithmetic" in block
