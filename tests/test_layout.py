"""One shape for every stage: rule -> script named like it -> one stage function named like
it; names, paths and variants written once (qlora_pipeline/layout.py) and agreeing with the
schema and the rules; the library imported as an installed package, never by a path edit."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import yaml

from conftest import REPO
from qlora_pipeline import layout
from qlora_pipeline.stages import rules, stage_function

RULE_FILES = {path.stem: path.read_text() for path in (REPO / "rules").glob("*.smk")}
DECLARED = {name: module for module, text in RULE_FILES.items()
            for name in re.findall(r"^rule (\w+):", text, re.M)}


def test_every_rule_has_its_script_and_stage_function():
    assert set(DECLARED) == set(rules())
    for rule, module in DECLARED.items():
        script = REPO / "scripts" / f"{rule}.py"
        text = script.read_text()
        assert f'script:\n        "../scripts/{rule}.py"' in RULE_FILES[module], rule
        assert f"from qlora_pipeline.stages.{module} import {rule}\n" in text, script
        assert f"run_script(snakemake, {rule})" in text, script
        assert stage_function(rule).__module__ == f"qlora_pipeline.stages.{module}"
        assert f'code=code("{rule}")' in RULE_FILES[module], f"rule {rule}: no params.code"


def test_stage_functions_take_keywords_and_a_policy():
    for rule in rules():
        params = inspect.signature(stage_function(rule)).parameters
        assert "policy" in params, rule
        assert all(p.kind == p.KEYWORD_ONLY for p in params.values()), rule


def test_no_sys_path_edits():
    for path in [*(REPO / "scripts").glob("*.py"), *(REPO / "rules").glob("*.smk"),
                 *(REPO / "benchmarks").glob("*.py"), REPO / "Snakefile"]:
        assert "sys.path" not in path.read_text(), path


def test_domain_code_never_imports_a_stage():
    package = REPO / "qlora_pipeline"
    for path in package.rglob("*.py"):
        if "stages" in path.relative_to(package).parts or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "stages" not in node.module.split("."), f"{path} imports {node.module}"


def test_schema_variants_are_the_layout_kinds():
    schema = yaml.safe_load((REPO / "config/schemas/config.schema.yaml").read_text())
    variants = schema["properties"]["evaluation"]["properties"]["variants"]
    assert variants["items"]["enum"] == list(layout.VARIANT_KINDS)
    assert variants["default"] == list(layout.VARIANT_KINDS)
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert set(config["evaluation"]["variants"]) <= set(layout.VARIANT_KINDS)


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
    assert found["spec"] == "results/eval/tasks/topic"
    if "adapter" in found:
        assert found["adapter"] == f"results/adapters/topic/{variant}"


def test_a_variant_from_another_task():
    """Parametrized variants: topic's adapter (or merged model) scored on arithmetic."""
    assert layout.parse_variant("qlora+topic") == ("qlora", "topic")
    found = layout.variant_inputs("qlora+topic", "arithmetic")
    assert found["adapter"] == "results/adapters/topic/qlora"
    assert found["spec"] == "results/eval/tasks/arithmetic"
    assert layout.variant_inputs("merged+topic", "arithmetic")["merged"] == \
        "results/models/merged/topic"
    for bad in ("fp8", "base+topic", "qlora+", "qlora+a/b"):
        with pytest.raises(ValueError, match="variant"):
            layout.parse_variant(bad)


def test_cross_task_variant_is_planned_by_the_rules(workdir, run_snakemake):
    out = run_snakemake(workdir, "-n", "results/eval/qlora+topic/arithmetic/results.json").stdout
    block = out.split("rule evaluate:", 1)[1].split("\n\n", 1)[0]
    assert "results/adapters/topic/qlora" in block and "results/eval/tasks/arithmetic" in block
