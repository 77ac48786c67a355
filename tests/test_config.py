"""qlora_pipeline.config: defaults, merging order and the wording of configuration errors."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, snakemake, write_yaml

from qlora_pipeline.config import deep_merge, load_config, read_configfiles
from qlora_pipeline.config.schema import load_yaml
from qlora_pipeline.core.errors import InputError

ARITHMETIC = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                            "num_examples": 20, "seed": 3}}
TOPIC = {"format": "completion", "dataset": {"source": "builtin", "name": "topic",
                                             "num_examples": 30},
         "tokenize": {"max_length": 64}}
BASE = {"tasks": ["arithmetic"], "base_model": {"source": "local", "path": "/models/tiny"}}


@pytest.fixture
def root(tmp_path) -> Path:
    write_yaml(tmp_path / "config/tasks/arithmetic.yaml", ARITHMETIC)
    write_yaml(tmp_path / "config/tasks/topic.yaml", TOPIC)
    return tmp_path


def load(root: Path, **changes):
    return load_config(deep_merge(copy.deepcopy(BASE), changes), root=root)


def error_of(root: Path, **changes) -> str:
    with pytest.raises(InputError) as info:
        load(root, **changes)
    return str(info.value)


def task_error(root: Path, task: dict, name: str = "arithmetic") -> str:
    path = write_yaml(root / f"config/tasks/{name}.yaml", task)
    with pytest.raises(InputError) as info:
        load(root, tasks=[name])
    message = str(info.value)
    assert str(path) in message  # the file is named
    return message


# ---- defaults and merging --------------------------------------------------------------------

def test_defaults_are_filled(root):
    config, tasks = load(root)
    assert config["quantization"] == {"method": "nf4", "double_quant": True,
                                      "compute_dtype": "auto", "skip_modules": ["lm_head"],
                                      "quant_storage": "uint8"}
    assert config["defaults"]["tokenize"] == {"max_length": 256, "train_on_prompt": False,
                                              "packing": False}
    assert config["seed"] == 0 and config["task_dir"] == "config/tasks"
    assert config["quantization_report"]["max_examples"] == 64
    assert config["base_model"]["dtype"] == "auto"
    task = tasks["arithmetic"]
    assert task["name"] == "arithmetic"
    assert task["tokenize"] == {"max_length": 256, "train_on_prompt": False, "packing": False}
    dataset = task["dataset"]
    assert (dataset["validation_fraction"], dataset["test_fraction"]) == (0.1, 0.1)
    assert dataset["columns"] == {} and dataset["seed"] == 3


def test_given_values_are_kept(root):
    config, _ = load(root, quantization={"method": "fp4", "double_quant": False}, seed=5)
    assert config["quantization"]["method"] == "fp4"
    assert config["quantization"]["double_quant"] is False
    assert config["quantization"]["skip_modules"] == ["lm_head"]  # the rest still defaulted
    assert config["seed"] == 5


def test_task_file_overrides_part_of_default_tokenize(root):
    _, tasks = load(root, tasks=["arithmetic", "topic"],
                    defaults={"tokenize": {"max_length": 200, "packing": True}})
    assert tasks["topic"]["tokenize"] == {"max_length": 64, "train_on_prompt": False,
                                          "packing": True}
    assert tasks["arithmetic"]["tokenize"] == {"max_length": 200, "train_on_prompt": False,
                                               "packing": True}


def test_task_overrides_merge_over_the_task_file(root):
    _, tasks = load(root, tasks=["arithmetic", "topic"], task_overrides={
        "arithmetic": {"dataset": {"num_examples": 50}, "tokenize": {"train_on_prompt": True}},
    })
    dataset = tasks["arithmetic"]["dataset"]
    assert dataset["num_examples"] == 50
    assert dataset["name"] == "arithmetic" and dataset["seed"] == 3  # the file's other keys
    assert tasks["arithmetic"]["tokenize"]["train_on_prompt"] is True
    assert tasks["arithmetic"]["tokenize"]["max_length"] == 256
    assert tasks["topic"]["dataset"]["num_examples"] == 30  # other tasks untouched


def test_global_seed_seeds_a_dataset_without_its_own(root):
    _, tasks = load(root, tasks=["arithmetic", "topic"], seed=11)
    assert tasks["topic"]["dataset"]["seed"] == 11
    assert tasks["arithmetic"]["dataset"]["seed"] == 3  # its own seed wins


def test_deep_merge_does_not_mutate_its_inputs():
    base, override = {"a": {"b": 1, "c": [1]}}, {"a": {"b": 2}}
    merged = deep_merge(base, override)
    merged["a"]["c"].append(2)
    assert merged == {"a": {"b": 2, "c": [1, 2]}}
    assert base == {"a": {"b": 1, "c": [1]}} and override == {"a": {"b": 2}}


def test_repository_config_and_tasks_are_valid():
    config, tasks = load_config(load_yaml(REPO / "config/config.yaml"), root=REPO)
    assert set(tasks) == set(config["tasks"]) == {"arithmetic", "topic"}
    for task in tasks.values():
        assert task["dataset"]["source"] == "builtin"
        assert task["tokenize"]["max_length"] == 256


# ---- errors ------------------------------------------------------------------------------------

def test_unknown_task_lists_the_known_tasks(root):
    message = error_of(root, tasks=["arithmetics"])
    assert "config key 'tasks': unknown task 'arithmetics'" in message
    assert "arithmetics.yaml" in message  # what was looked for
    known = message.split("expected")[1]
    assert re.search(r"\barithmetic, topic$", known), known


def test_task_overrides_for_an_unlisted_task(root):
    message = error_of(root, task_overrides={"topics": {"format": "chat"}})
    assert "task_overrides" in message and "topics" in message and "expected" in message


@pytest.mark.parametrize("task, key, found, expected", [
    ({**ARITHMETIC, "format": "chatml"}, "format", '"chatml"', "alpaca, chat, completion"),
    ({"format": "chat", "dataset": {"source": "s3", "name": "x"}}, "dataset.source", '"s3"',
     "builtin, local, hub"),
    (deep_merge(ARITHMETIC, {"dataset": {"num_examples": "many"}}), "dataset.num_examples",
     '"many"', "type integer"),
    (deep_merge(ARITHMETIC, {"dataset": {"num_examples": 5}}), "dataset.num_examples",
     "5", ">= 10"),
    (deep_merge(ARITHMETIC, {"dataset": {"name": "algebra"}}), "dataset.name", '"algebra"',
     "arithmetic, topic"),
    (deep_merge(ARITHMETIC, {"dataset": {"validation_fraction": 0.7}}),
     "dataset.validation_fraction", "0.7", "< 0.5"),
    (deep_merge(ARITHMETIC, {"tokenize": {"max_length": "long"}}), "tokenize.max_length",
     '"long"', "type integer"),
])
def test_bad_task_value(root, task, key, found, expected):
    message = task_error(root, task)
    assert f"key '{key}': found {found}, expected" in message
    assert expected in message


def test_hub_dataset_without_revision(root):
    message = task_error(root, {"format": "chat", "dataset": {"source": "hub", "name": "org/ds"}})
    assert "key 'dataset'" in message and "'revision'" in message
    assert "expected" in message and "dataset.source is hub" in message


def test_arithmetic_options_are_checked_before_any_job(root):
    ok = load(root, tasks=["arithmetic"])[1]["arithmetic"]
    assert "options" not in ok["dataset"]  # the generator's own defaults apply
    options = {"min_operand": 0, "max_operand": 2}  # 3·3·2 = 18 distinct problems
    too_many = task_error(root, deep_merge(ARITHMETIC, {"dataset": {"options": options}}))
    assert ("dataset.num_examples: found 20, but operands 0..2 with '+-' make only 18 "
            "distinct problems; expected at most 18") in too_many
    reversed_range = task_error(root, deep_merge(ARITHMETIC, {"dataset": {
        "options": {"min_operand": 30, "max_operand": 20}}}))
    assert "found min_operand 30 above max_operand 20" in reversed_range
    bad_op = task_error(root, deep_merge(ARITHMETIC, {"dataset": {"options": {"operations": "*"}}}))
    assert "key 'dataset.options.operations': found \"*\"" in bad_op
    filled = task_error(root, deep_merge(TOPIC, {"dataset": {"options": {"max_operand": 9}}}),
                        name="topic")
    assert "key 'dataset.options': found it for source 'builtin' topic" in filled


def test_system_prompt_only_for_chat(root):
    chat = deep_merge(ARITHMETIC, {"dataset": {"system_prompt": "Be brief."}})
    write_yaml(root / "config/tasks/arithmetic.yaml", chat)
    assert load(root)[1]["arithmetic"]["dataset"]["system_prompt"] == "Be brief."
    message = task_error(root, deep_merge(TOPIC, {"dataset": {"system_prompt": "Be brief."}}),
                         name="topic")
    assert "key 'dataset.system_prompt': found format 'completion'; expected format 'chat'" in message


def test_local_dataset_needs_exactly_one_of_path_and_files(root):
    both = task_error(root, {"format": "chat", "dataset": {
        "source": "local", "path": "a.jsonl", "files": {"train": "b.jsonl"}}})
    assert "key 'dataset': found path, files; expected exactly one of: path | files" in both
    neither = task_error(root, {"format": "chat", "dataset": {"source": "local"}})
    assert "expected exactly one of: path | files" in neither


def test_misspelled_task_key(root):
    task = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                          "num_exampels": 20}}
    message = task_error(root, task)
    assert "key 'dataset'" in message and "'num_exampels'" in message
    assert "did you mean 'num_examples'" in message and "expected" in message


def test_task_file_that_is_not_a_mapping(root):
    message = task_error(root, ["format", "chat"])
    assert "expected a mapping" in message and "found list" in message


def test_bad_value_from_task_overrides_names_the_override(root):
    message = error_of(root, task_overrides={"arithmetic": {"dataset": {"seed": "x"}}})
    assert "arithmetic.yaml" in message and "task_overrides.arithmetic" in message
    assert "key 'dataset.seed': found \"x\", expected a value of type integer" in message


@pytest.mark.parametrize("changes, key, found, expected", [
    ({"seed": "abc"}, "seed", '"abc"', "a value of type integer"),
    ({"base_model": {"source": "ftp"}}, "base_model.source", '"ftp"', "one of gguf, hub, local"),
    ({"quantization": {"method": "hqq", "bits": 5}}, "quantization.bits", "5",
     "one of 1, 2, 3, 4, 8"),
    ({"defaults": {"tokenize": {"max_length": 4}}}, "defaults.tokenize.max_length", "4",
     "a number >= 8"),
    ({"tasks": []}, "tasks", "[]", "at least 1 item"),
    ({"tasks": ["a b"]}, "tasks.0", '"a b"', "a string matching"),
])
def test_bad_config_value(root, changes, key, found, expected):
    message = error_of(root, **changes)
    assert message.startswith("config: invalid configuration")
    assert f"key '{key}': found {found}, expected {expected}" in message


def test_an_unknown_quantization_method_is_named_with_the_methods_there_are(root):
    """The methods are their modules (models/methods/), not a list in the schema."""
    assert error_of(root, quantization={"method": "int4"}) == (
        "config key 'quantization.method': found 'int4'; expected one of nf4, fp4, int8, hqq")


@pytest.mark.parametrize("changes, key, unknown, suggestion", [
    ({"sed": 1}, "<top level>", "sed", "seed"),
    ({"quantization": {"methd": "nf4"}}, "quantization", "methd", "method"),
    ({"defaults": {"tokenize": {"max_len": 64}}}, "defaults.tokenize", "max_len", "max_length"),
])
def test_misspelled_config_key(root, changes, key, unknown, suggestion):
    message = error_of(root, **changes)
    assert f"key '{key}': found unknown key(s) '{unknown}' (did you mean '{suggestion}'?)" \
        in message
    assert "expected only" in message


def test_conditional_model_keys(root):
    config = copy.deepcopy(BASE)
    config["base_model"] = {"source": "hub", "id": "org/model"}
    with pytest.raises(InputError) as info:
        load_config(config, root=root)
    assert re.search(r"key 'base_model': missing required key 'revision'.*expected 'revision' "
                     r"to be set when base_model\.source is hub", str(info.value))
    config["base_model"] = {"source": "gguf", "path": "m.gguf", "package": "p", "file": "f"}
    with pytest.raises(InputError, match=r"found path, package, file; expected exactly one of: "
                                         r"path \| package \+ file"):
        load_config(config, root=root)


def test_several_errors_are_all_reported(root):
    message = error_of(root, seed="x", quantization={"double_quant": "yes"})
    assert "key 'seed'" in message and "key 'quantization.double_quant'" in message


def test_invalid_yaml_names_the_file(root):
    path = root / "config/tasks/arithmetic.yaml"
    path.write_text("format: chat\ndataset: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(str(path)) + ": not valid YAML"):
        load(root)


def test_distributed_training_settings(root):
    """One process by default; ddp on N processes is accepted; several processes without a
    strategy, or several nodes off Slurm at launch, are refused with the key named. A task
    trained with FSDP makes the quantize stage store the 4-bit weights in the compute dtype."""
    _, tasks = load(root)
    assert tasks["arithmetic"]["train"]["distributed"] == {"strategy": "none", "processes": 1,
                                                           "nodes": 1}
    message = error_of(root, task_overrides={"arithmetic": {
        "train": {"distributed": {"processes": 2}}}})
    assert "train.distributed" in message and "strategy 'none'" in message \
        and "expected strategy ddp or fsdp" in message
    config, tasks = load(root, task_overrides={"arithmetic": {
        "train": {"distributed": {"strategy": "ddp", "processes": 2}}}})
    assert tasks["arithmetic"]["train"]["distributed"]["processes"] == 2
    assert config["quantization"]["quant_storage"] == "uint8"
    config, _ = load(root, task_overrides={"arithmetic": {
        "train": {"distributed": {"strategy": "fsdp", "processes": 2}}}})
    assert config["quantization"]["quant_storage"] == "compute"
    config, _ = load(root, quantization={"quant_storage": "uint8"}, task_overrides={
        "arithmetic": {"train": {"distributed": {"strategy": "fsdp", "processes": 2}}}})
    assert config["quantization"]["quant_storage"] == "uint8"  # the user's choice stands


def test_trackers_leave_the_train_block_and_a_missing_package_is_refused(root, monkeypatch):
    """train.report_to: tensorboard by default; every row of the trainings table holds it
    beside its train block, which the rules pass and the checkpoint key hashes, so a tracker
    changes neither. A tracker whose package is missing is refused, naming the pip command."""
    import importlib.util

    _, tasks = load(root)
    assert tasks["arithmetic"]["train"]["report_to"] == ["tensorboard"]
    _, chosen = load(root, defaults={"train": {"report_to": ["mlflow", "tensorboard"]}})
    row, default_row = chosen["arithmetic"]["trainings"][""], tasks["arithmetic"]["trainings"][""]
    assert row["report_to"] == ["mlflow", "tensorboard"] and "report_to" not in row["train"]
    assert row["train"] == default_row["train"]
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else found(name, *a))
    message = error_of(root, defaults={"train": {"report_to": ["mlflow"]}})
    assert "key 'train.report_to': found mlflow, whose package is not installed" in message \
        and "pip install mlflow-skinny" in message


# ---- quantization methods (qlora_pipeline/config/quantization.py) ---------------------------

def test_each_method_keeps_only_its_own_keys(root):
    hqq, _ = load(root, quantization={"method": "hqq", "bits": 3})
    assert hqq["quantization"] == {"method": "hqq", "bits": 3, "group_size": 64,
                                   "compute_dtype": "auto", "skip_modules": ["lm_head"]}
    int8, _ = load(root, quantization={"method": "int8"})
    assert set(int8["quantization"]) == {"method", "compute_dtype", "skip_modules"}


@pytest.mark.parametrize("quantization, key", [
    ({"method": "nf4", "bits": 3}, "quantization.bits"),
    ({"method": "hqq", "double_quant": False}, "quantization.double_quant"),
    ({"method": "int8", "group_size": 32}, "quantization.group_size"),
    ({"method": "hqq", "quant_storage": "compute"}, "quantization.quant_storage"),
])
def test_a_key_of_another_method_is_refused(root, quantization, key):
    message = error_of(root, quantization=quantization)
    assert f"config key '{key}': found it with method '{quantization['method']}'" in message


def test_the_old_quant_type_key_names_its_replacement(root):
    assert "renamed 'quantization.method'" in error_of(root, quantization={"quant_type": "nf4"})


def test_sweep_points_are_settled_named_and_unique(root):
    config, _ = load(root, quantization_sweep=[{"method": "hqq", "bits": 2},
                                               {"method": "nf4", "double_quant": False}])
    from qlora_pipeline.config.quantization import label
    assert [label(p) for p in config["quantization_sweep"]] == ["hqq2-g64", "nf4-nodq"]
    assert config["quantization_sweep"][0]["skip_modules"] == ["lm_head"]  # quantization's
    message = error_of(root, quantization_sweep=[{"method": "int8"}, {"method": "int8"}])
    assert "config key 'quantization_sweep[1]'" in message and "int8" in message


# ---- config files and --config, merged as snakemake passes them (read_configfiles) -----------

MAIN = REPO / "config/config.yaml"
HQQ = {"method": "hqq", "bits": 3, "group_size": 64}
HUB = {"source": "hub", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}
# docs/cluster.md's DDP command's --config value
DDP = ('task_overrides={"topic": {"train": {"batch_size": 4, "distributed": '
       '{"strategy": "ddp", "processes": 2}}}}')


def with_overlay(tmp_path: Path, **layer) -> list[Path]:
    return [MAIN, write_yaml(tmp_path / "overlay.yaml", layer)]


def command_line(*entries: str) -> dict:
    """--config key=value entries as Snakemake's parse_config hands them over: a mapping read
    with YAML's BaseLoader, every leaf text (importing snakemake.cli takes seconds)."""
    return {key: yaml.load(value, Loader=yaml.BaseLoader)
            for key, value in (entry.split("=", 1) for entry in entries)}


def test_an_overlay_switching_method_or_source_gives_the_block_whole(tmp_path):
    config = read_configfiles(with_overlay(tmp_path, quantization=HQQ, base_model=HUB))
    assert config["quantization"] == HQQ  # config.yaml's double_quant gone
    assert config["base_model"] == HUB  # and its package and file
    config, _ = load_config(config, root=REPO)
    assert config["quantization"]["bits"] == 3 and "double_quant" not in config["quantization"]


def test_an_overlay_keeping_method_or_source_merges_key_by_key(tmp_path):
    main = load_yaml(MAIN)
    config = read_configfiles(with_overlay(
        tmp_path, quantization={"method": "nf4", "double_quant": False},
        base_model={"source": "gguf", "dtype": "float32"}))
    assert config["quantization"] == {**main["quantization"], "double_quant": False}
    assert config["base_model"] == {**main["base_model"], "dtype": "float32"}
    # An earlier block without a method has the schema's default (nf4): no switch.
    first = write_yaml(tmp_path / "first.yaml", {"quantization": {"double_quant": False}})
    second = write_yaml(tmp_path / "second.yaml", {"quantization": {"method": "nf4"}})
    assert read_configfiles([first, second]) == {
        "quantization": {"double_quant": False, "method": "nf4"}}


def test_config_values_are_typed_by_the_schema():
    config = read_configfiles([MAIN], command_line(
        DDP, "run=null", "evaluation={limit: null, batch_size: 4}",
        "defaults={train: {learning_rate: 3e-4}}", "base_model={revision: 1234, id: x}",
        "quantization={method: hqq, bits: 3}"))
    assert config["run"] is None
    assert (config["evaluation"]["limit"], config["evaluation"]["batch_size"]) == (None, 4)
    assert config["defaults"]["train"]["learning_rate"] == 3e-4  # a string to YAML 1.1
    assert config["base_model"]["revision"] == "1234"  # text where the schema asks for text
    assert config["quantization"] == {"method": "hqq", "bits": 3}  # switched here too
    config = read_configfiles([MAIN], command_line(DDP))
    _, tasks = load_config(config, root=REPO)
    assert tasks["topic"]["train"]["batch_size"] == 4
    assert tasks["topic"]["train"]["distributed"] == {"strategy": "ddp", "processes": 2,
                                                      "nodes": 1}


@pytest.mark.parametrize("value", ["four", "4.5"])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_key(value):
    """Text that reads as nothing the key takes stays text: refused as without coercion."""
    config = read_configfiles([MAIN], command_line(DDP.replace("4", value)))
    with pytest.raises(InputError) as info:
        load_config(config, root=REPO)
    assert "topic.yaml (with config task_overrides.topic merged)" in str(info.value)
    assert (f"key 'train.batch_size': found \"{value}\", expected a value of type integer"
            in str(info.value))


def test_snakemake_merges_config_yaml_then_each_configfile_then_config(tmp_path):
    """The workflow's own layers, in order: run from the overlay (config.yaml's is first,
    under it), hqq switched in whole, and the DDP values typed."""
    shutil.copytree(REPO / "config/tasks", tmp_path / "config/tasks")
    write_yaml(tmp_path / "config/config.yaml", {**load_yaml(MAIN), "run": "main-run"})
    overlay = write_yaml(tmp_path / "overlay.yaml", {"run": "overlay-run", "quantization": HQQ})
    result = snakemake(tmp_path, "-n", "--configfile", str(overlay), "--config", DDP, slots=2)
    assert "results/overlay-run/models/quantized" in result.stdout
    assert "main-run" not in result.stdout


def test_a_combination_of_a_task_trained_on_its_own_base_is_refused(root):
    both = {"tasks": ["arithmetic", "topic"],
            "combinations": [{"name": "both", "tasks": ["arithmetic", "topic"], "method": "sum"}]}
    message = error_of(root, **both, task_overrides={"topic": {"lora": {"init": "pissa"}}})
    assert re.fullmatch(r"config key 'combinations\[0\]' \(both\): tasks \['topic'\] train on "
                        r"a quantized base of their own \(pissa-[0-9a-f]{10}: .*; expected "
                        r"tasks trained on the shared base .*", message)
    load(root, **both, task_overrides={"topic": {"lora": {"init": "loftq"}}})  # the shared base


def test_an_adapter_initialised_from_the_base_is_not_put_on_the_full_precision_base(root):
    message = error_of(root, task_overrides={"arithmetic": {
        "lora": {"init": "pissa"}, "recovery": {"enabled": True}}})
    assert re.search(r"arithmetic.yaml.*: trainings \[\"the task's own\"\] have lora.init loftq "
                     r"or pissa and are recovered; expected no recovery", message)
    message = error_of(root, task_overrides={"arithmetic": {
        "lora": {"init": "loftq"}, "merge": {"base": "full"}}})
    assert "merge.base full with lora.init loftq; expected auto or dequantized" in message
    message = error_of(root, task_overrides={"arithmetic": {"lora": {
        "init": "pissa", "use_rslora": True, "rank_pattern": {"q_proj": 2}}}})
    assert "with use_rslora and a rank_pattern; expected one of the two: PEFT cannot" in message
    load(root, task_overrides={"arithmetic": {"lora": {"init": "loftq"}}})  # merge.base auto
