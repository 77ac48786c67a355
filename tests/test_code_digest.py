"""Library code is a rerun trigger, stage by stage: a rule's params.code is a digest of the
code its stage runs (qlora_pipeline/code_digest.py)."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO

from qlora_pipeline import code_digest
from qlora_pipeline.stages import rules

TRAINING_LOOP_RULES = {"train_qlora", "recover", "train_sweep_point", "recover_sweep_point"}


@pytest.fixture
def package(tmp_path):
    """A private copy of the library to edit."""
    copy = tmp_path / "qlora_pipeline"
    shutil.copytree(REPO / "qlora_pipeline", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def digests(root) -> dict[str, str]:
    return {rule: code_digest.for_rule(rule, root) for rule in rules()}


def changed(before: dict, after: dict) -> set[str]:
    return {rule for rule in before if before[rule] != after[rule]}


def test_the_copy_digests_like_the_library(package):
    assert digests(package) == digests(REPO / "qlora_pipeline")


def test_editing_the_training_loop_changes_training_only(package):
    before = digests(package)
    loop = package / "training/loop.py"
    loop.write_text(loop.read_text().replace('"steps": trainer.state.global_step,',
                                             '"steps": int(trainer.state.global_step),'))
    assert changed(before, digests(package)) == TRAINING_LOOP_RULES


def test_a_comment_is_not_an_edit(package):
    before = digests(package)
    loop = package / "training/loop.py"
    loop.write_text("# a comment\n" + loop.read_text().replace("\n\n\n", "\n\n\n\n", 1))
    assert changed(before, digests(package)) == set()


def test_editing_one_stage_function_changes_that_rule_only(package):
    before = digests(package)
    train = package / "stages/train.py"
    text = train.read_text()
    edit = ('shard_bytes = merge["max_shard_mb"] * 1024 ** 2',
            'shard_bytes = merge["max_shard_mb"] * 2 ** 20')
    assert edit[0] in text.split("def merge(", 1)[1]
    train.write_text(text.replace(edit[0], *edit[1:]))
    assert changed(before, digests(package)) == {"merge"}


@pytest.mark.parametrize("module, rules_changed", [
    # promote_sweep_point: its task's metric name (evaluation/tasks.py reads formats);
    # export_gguf: the merged model's answers are the chat command's (chat.py renders prompts)
    ("data/formats.py", {"fetch_dataset", "tokenize", "eval_task_spec", "evaluate",
                         "evaluate_sweep_point", "promote_sweep_point", "report",
                         "export_gguf"}),
    # analyze_*: models/checkpoint.py reads a quantized base through models/methods/
    ("models/numerics.py", {"quantize", "quantization_report", "train_qlora", "recover",
                            "merge", "evaluate", "compress_adapter", "train_sweep_point",
                            "recover_sweep_point", "evaluate_sweep_point", "combine_adapters",
                            "analyze_adapter", "analyze_sweep_point",
                            "quantization_sweep_point", "export_gguf"}),
    # combine_adapters: through compress.split (compress.py imports recommend)
    ("analysis/recommend.py", {"analyze_adapter", "compress_adapter", "analyze_sweep_point",
                               "combine_adapters"}),
    ("analysis/overlap.py", {"combine_adapters"}),
    ("evaluation/combination_report.py", {"report"}),
    ("evaluation/reporting.py", {"report"}),
])
def test_what_each_module_reaches(package, module, rules_changed):
    before = digests(package)
    path = package / module
    path.write_text(path.read_text() + "\n\ndef _added():\n    return 1\n")
    assert changed(before, digests(package)) == rules_changed


def test_unknown_rule():
    with pytest.raises(KeyError, match="no stage function named 'nope'"):
        code_digest.for_rule("nope")


def test_a_library_edit_reruns_what_uses_it(copy_run, tmp_path):
    """The measured rerun set after an edit to the training loop: training, recovery, merge,
    the scores and analyses of what they made, and the report; nothing of data or quantization.
    (On an edited copy of the workflow and library: Snakemake imports the library from the
    workflow's folder when it parses the rules.)"""
    from test_incremental import planned_with

    repo = tmp_path / "repo"
    for part in ("Snakefile", "rules", "scripts", "envs", "report", "config/schemas",
                 "qlora_pipeline"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / part, repo / part)
    loop = repo / "qlora_pipeline/training/loop.py"
    loop.write_text(loop.read_text().replace('"steps": trainer.state.global_step,',
                                             '"steps": int(trainer.state.global_step),'))
    workdir = copy_run()
    assert planned_with(workdir, repo=repo) == {
        ("train_qlora", "arithmetic", ""), ("train_qlora", "topic", ""),
        ("recover", "arithmetic", ""), ("merge", "arithmetic", ""), ("merge", "topic", ""),
        ("evaluate", "arithmetic", "qlora"), ("evaluate", "arithmetic", "recovered"),
        ("evaluate", "arithmetic", "merged"), ("evaluate", "topic", "qlora"),
        ("evaluate", "topic", "merged"), ("analyze_adapter", "arithmetic", "qlora"),
        ("analyze_adapter", "arithmetic", "recovered"), ("analyze_adapter", "topic", "qlora"),
        ("compress_adapter", "topic", ""), ("evaluate", "topic", "compressed"),
        ("combine_adapters", "", "both"), ("evaluate", "arithmetic", "combined+both"),
        ("evaluate", "topic", "combined+both"), ("evaluate", "arithmetic", "qlora+topic"),
        ("evaluate", "topic", "qlora+arithmetic"),
        *[(rule, "topic", point) for point in ("r1", "r2") for rule in (
            "train_sweep_point", "evaluate_sweep_point", "analyze_sweep_point")],
        ("report", "", ""),
    }
    assert planned_with(workdir) == set()  # the library as it is: nothing to do
