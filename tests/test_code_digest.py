"""Library code is a rerun trigger, stage by stage: a rule's params.code is a digest of the
code its stage runs (qlora_pipeline/jobs/code_digest.py); the code that only decides how a job
runs (code_digest.INFRASTRUCTURE) is none."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO

from qlora_pipeline.jobs import code_digest

TRAINING_LOOP_RULES = {"train_qlora", "recover"}  # every row of the trainings table


@pytest.fixture
def package(tmp_path):
    """A private copy of the library to edit."""
    copy = tmp_path / "qlora_pipeline"
    shutil.copytree(REPO / "qlora_pipeline", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def digests(root) -> dict[str, str]:
    return {rule: code_digest.for_rule(rule, root) for rule in code_digest.stage_functions()}


def changed(before: dict, after: dict) -> set[str]:
    return {rule for rule in before if before[rule] != after[rule]}


def test_the_copy_digests_like_the_library(package):
    assert digests(package) == digests(REPO / "qlora_pipeline")


def test_digests_are_read_back_until_a_library_file_changes(package, tmp_path, monkeypatch):
    """A no-op parse reads the digests from disk; any edit, or a torn cache, recomputes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = code_digest.for_rule("merge", package)
    cache = next((tmp_path / "cache" / "qlora-pipeline").glob("code-digests-*.json"))
    record = json.loads(cache.read_text())
    assert record["digests"] == {"merge": first}
    cache.write_text(json.dumps({**record, "digests": {"merge": "read back"}}))
    assert code_digest.for_rule("merge", package) == "read back"
    errors = package / "core/errors.py"
    errors.write_text(errors.read_text() + "\n")  # a new stamp; the same code
    assert code_digest.for_rule("merge", package) == first
    cache.write_text("{torn")
    assert code_digest.for_rule("merge", package) == first


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
    ("data/formats.py", {"fetch_dataset", "tokenize", "eval_task_spec", "evaluate"}),
    # not the adapter analysis: it reads a quantized base through models/methods/ alone
    ("models/numerics.py", {"quantize", "quantize_for_training", "quantization_report",
                            "train_qlora", "recover",
                            "merge", "evaluate", "compress_adapter", "combine_adapters",
                            "quantization_sweep_point", "export_gguf"}),
    # the rank recommendation: the analysis alone (compress.py takes energy_rank from spectrum)
    ("analysis/recommend.py", {"analyze_adapter"}),
    # combine_adapters: through compress.split and compress.save_adapter
    ("analysis/compress.py", {"compress_adapter", "combine_adapters"}),
    ("analysis/overlap.py", {"combine_adapters"}),
    ("report/combinations.py", {"report"}),
    # the score of a results.json: the report shows it, the promotion compares it
    ("report/scores.py", {"report", "promote_sweep_point"}),
    # the sweep's rule of choice: the report shows it, the promotion applies it
    ("report/sweeps.py", {"report", "promote_sweep_point"}),
])
def test_what_each_module_reaches(package, module, rules_changed):
    before = digests(package)
    path = package / module
    path.write_text(path.read_text() + "\n\ndef _added():\n    return 1\n")
    assert changed(before, digests(package)) == rules_changed


def test_unknown_rule():
    with pytest.raises(KeyError, match="no stage named 'nope'"):
        code_digest.for_rule("nope")


def infrastructure_files(root) -> list:
    """The files of code_digest.INFRASTRUCTURE, under `root` (a copy of the package)."""
    found = []
    for module in code_digest.INFRASTRUCTURE:
        path = root.joinpath(*module.split(".")[1:])
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return found


def test_infrastructure_is_listed_and_no_trigger(package):
    """Each listed module exists; a statement added to any of them changes no rule's digest."""
    files = infrastructure_files(package)
    assert {f.relative_to(package).as_posix() for f in files} >= {
        "jobs/runner.py", "jobs/warm_start.py", "jobs/gpus.py", "jobs/launch.py",
        "jobs/outputs.py", "jobs/provenance.py", "jobs/code_digest.py",
        "jobs/environment.py", "core/memory.py", "core/machine.py", "core/disk.py"}
    before = digests(package)
    for path in files:
        path.write_text(path.read_text() + "\n_UNUSED = 1\n")
        assert changed(before, digests(package)) == set(), path


def test_a_library_edit_reruns_what_uses_it(copy_run, tmp_path):
    """On a finished tiny run: an edit to every module of code_digest.INFRASTRUCTURE plans
    nothing; then the measured rerun set after an edit to the training loop: every training
    of the table, recovery, merge, the scores and analyses of what they made, and the report;
    nothing of data or quantization. (On an edited copy of the workflow and library:
    Snakemake imports the library from the workflow's folder when it parses the rules.)"""
    from test_incremental import planned_with

    repo = tmp_path / "repo"
    for part in ("Snakefile", "rules", "scripts", "envs", "report", "config/schemas",
                 "qlora_pipeline"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / part, repo / part)
    for path in infrastructure_files(repo / "qlora_pipeline"):
        path.write_text(path.read_text() + "\n_UNUSED = 1\n")
    workdir = copy_run()
    assert planned_with(workdir, repo=repo) == set()
    loop = repo / "qlora_pipeline/training/loop.py"
    loop.write_text(loop.read_text().replace('"steps": trainer.state.global_step,',
                                             '"steps": int(trainer.state.global_step),'))
    assert planned_with(workdir, repo=repo) == {
        ("train_qlora", "arithmetic", "qlora"), ("train_qlora", "topic", "qlora"),
        ("train_qlora", "topic", "qlora@r1"), ("train_qlora", "topic", "qlora@r2"),
        ("recover", "arithmetic", "recovered"), ("merge", "arithmetic", ""),
        ("merge", "topic", ""),
        ("evaluate", "arithmetic", "qlora"), ("evaluate", "arithmetic", "recovered"),
        ("evaluate", "arithmetic", "merged"), ("evaluate", "topic", "qlora"),
        ("evaluate", "topic", "merged"), ("evaluate", "topic", "qlora@r1"),
        ("evaluate", "topic", "qlora@r2"), ("analyze_adapter", "arithmetic", "qlora"),
        ("analyze_adapter", "arithmetic", "recovered"), ("analyze_adapter", "topic", "qlora"),
        ("analyze_adapter", "topic", "qlora@r1"), ("analyze_adapter", "topic", "qlora@r2"),
        ("compress_adapter", "topic", ""), ("evaluate", "topic", "compressed"),
        ("combine_adapters", "", "both"), ("evaluate", "arithmetic", "combined+both"),
        ("evaluate", "topic", "combined+both"), ("evaluate", "arithmetic", "qlora+topic"),
        ("evaluate", "topic", "qlora+arithmetic"), ("report", "", ""),
    }
    assert planned_with(workdir) == set()  # the library as it is: nothing to do
