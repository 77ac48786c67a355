"""Evaluation: each task's test split as an lm-eval task, benchmark checks, loading every
model variant, and one variant x task evaluation end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import job_policy, stage
from qlora_pipeline.data import formats
from qlora_pipeline.data.sources import read_split
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.evaluation import harness, tasks
from qlora_pipeline.core.layout import evaluation
from qlora_pipeline.core.files import read_jsonl

FORMATS = {"arithmetic": "chat", "topic": "completion"}
EVAL_CFG = {"benchmarks": [], "num_fewshot": 0, "limit": 3, "batch_size": "auto",
            "max_gen_tokens": 4}


def dataset(name: str, num_examples: int = 40) -> dict:
    return {"source": "builtin", "name": name, "num_examples": num_examples, "seed": 1,
            "validation_fraction": 0.1, "test_fraction": 0.2, "columns": {}}


def located(spec_dir):
    """The spec as lm-eval is given it: data file paths made absolute, in a fresh folder."""
    import tempfile
    from pathlib import Path

    return harness.located_spec(spec_dir, Path(tempfile.mkdtemp(prefix="located-")))


def lm_eval_tasks(spec_dir) -> list[str]:
    from lm_eval.tasks import TaskManager

    return list(TaskManager(include_path=str(located(spec_dir)), include_defaults=False).all_tasks)


def built_task(spec_dir, name: str):
    """The lm-eval task object our YAML describes (its data loaded from the data file)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(located(spec_dir)), include_defaults=False)
    return get_task_dict([name], manager)[name]


def eval_outputs(root, variant: str, task: str) -> dict:
    return {name: root / path for name, path in evaluation(variant, task).items()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """Raw splits of both builtin tasks: arithmetic as chat, topic as completion."""
    root = tmp_path_factory.mktemp("eval-raw")
    for name, fmt in FORMATS.items():
        stage("fetch_dataset")(raw=root / name, dataset=dataset(name), format=fmt)
    return {name: root / name for name in FORMATS}


@pytest.fixture(scope="module")
def specs(tmp_path_factory, raw, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("eval-specs")
    for name, fmt in FORMATS.items():
        stage("eval_task_spec")(raw=raw[name], base=tiny_model_dir, spec=root / name, format=fmt,
                                max_gen_tokens=8, task=name)
    return {name: root / name for name in FORMATS}


@pytest.fixture(scope="module")
def default_index():
    """lm-eval's index of its own tasks, built once (seconds) and shared by the checks."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture
def shared_index(monkeypatch, default_index):
    import lm_eval.tasks

    def manager(*args, **kwargs):
        assert not args and not kwargs, "check_benchmarks should index lm-eval's own tasks"
        return default_index

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)


# ---- the task files ------------------------------------------------------------------------

def test_chat_task_renders_the_chat_template_and_generates(specs, raw, tiny_tokenizer):
    out = specs["arithmetic"]
    records = read_split(raw["arithmetic"], "test")
    docs = read_jsonl(out / "test.jsonl")
    assert len(docs) == len(records) > 0
    for record, doc in zip(records, docs):
        prompt = formats.prompt_text(record, "chat", tiny_tokenizer)
        assert doc["prompt"] == prompt
        user = record["messages"][0]["content"]
        assert prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert doc["answer"] == record["messages"][-1]["content"]
        assert doc["answer"].lstrip("-").isdigit()
        assert "choices" not in doc

    spec = yaml.safe_load((out / "qlora_arithmetic.yaml").read_text(encoding="utf-8"))
    assert spec["task"] == "qlora_arithmetic"
    assert spec["output_type"] == "generate_until"
    assert spec["doc_to_text"] == "prompt" and spec["doc_to_target"] == "answer"
    assert [m["metric"] for m in spec["metric_list"]] == ["exact_match"]
    until = spec["generation_kwargs"]["until"]
    assert "\n" in until and tiny_tokenizer.eos_token in until
    assert spec["generation_kwargs"]["max_gen_toks"] == 8
    assert spec["generation_kwargs"]["do_sample"] is False
    # Named relative to the spec's folder: results/ can move (no absolute path is stored).
    assert spec["dataset_kwargs"]["data_files"]["test"] == "test.jsonl"
    assert str(out.parent) not in (out / "qlora_arithmetic.yaml").read_text(encoding="utf-8")
    assert json.loads((out / "task.json").read_text()) == {
        "name": "qlora_arithmetic", "kind": "generate_until", "examples": len(records)}
    assert json.loads((out / "provenance.json").read_text())["stage"] == "eval_task_spec"
    assert not list(out.parent.glob(".*tmp-*"))

    assert "qlora_arithmetic" in lm_eval_tasks(out)
    task = built_task(out, "qlora_arithmetic")
    first = list(task.test_docs())[0]
    assert task.doc_to_text(first) == docs[0]["prompt"]
    assert task.doc_to_target(first) == docs[0]["answer"]


def test_classification_task_is_multiple_choice(specs, raw, tiny_tokenizer):
    out = specs["topic"]
    records = read_split(raw["topic"], "test")
    docs = read_jsonl(out / "test.jsonl")
    assert len(docs) == len(records) > 0
    for record, doc in zip(records, docs):
        assert doc["prompt"] == record["prompt"] and doc["prompt"].endswith("\n")
        assert doc["choices"] == ["sports", "food", "weather", "technology"]
        assert isinstance(doc["label"], int) and doc["label"] == record["label"]
        assert doc["choices"][doc["label"]] == doc["answer"] == record["completion"]

    spec = yaml.safe_load((out / "qlora_topic.yaml").read_text(encoding="utf-8"))
    assert spec["output_type"] == "multiple_choice"
    assert spec["doc_to_choice"] == "choices" and spec["doc_to_target"] == "label"
    assert [m["metric"] for m in spec["metric_list"]] == ["acc"]
    assert "generation_kwargs" not in spec
    assert spec["dataset_kwargs"]["data_files"]["test"] == "test.jsonl"

    assert lm_eval_tasks(out) == ["qlora_topic"]
    task = built_task(out, "qlora_topic")
    first = list(task.test_docs())[0]
    assert task.doc_to_text(first) == docs[0]["prompt"]
    assert task.doc_to_choice(first) == docs[0]["choices"]
    assert task.doc_to_target(first) == docs[0]["label"]


def test_alpaca_and_completion_prompts(tmp_path, tiny_tokenizer):
    alpaca = [{"instruction": "What is 2 + 3?", "input": "", "output": "5"},
              {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5 "}]
    completion = [{"prompt": "What is 2 + 3?\n", "completion": "5"}]
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "completion").mkdir()
    info = tasks.write_task("a", alpaca, "alpaca", tiny_tokenizer, tmp_path / "alpaca", 4)
    assert info == {"name": "qlora_a", "kind": "generate_until", "examples": 2}
    docs = read_jsonl(tmp_path / "alpaca/test.jsonl")
    assert docs[0]["prompt"] == formats.ALPACA_NO_INPUT.format(instruction="What is 2 + 3?")
    assert docs[1]["prompt"] == formats.ALPACA_INPUT.format(instruction="Add the numbers.",
                                                            input="2 and 3")
    assert docs[1]["prompt"].endswith("### Response:\n")
    assert [d["answer"] for d in docs] == ["5", "5"]  # stripped, as exact match compares

    tasks.write_task("c", completion, "completion", tiny_tokenizer, tmp_path / "completion", 4)
    assert read_jsonl(tmp_path / "completion/test.jsonl") == [
        {"prompt": "What is 2 + 3?\n", "answer": "5"}]
    for fmt, name in (("alpaca", "qlora_a"), ("completion", "qlora_c")):
        assert name in lm_eval_tasks(tmp_path / fmt)


def test_task_spec_with_an_awkward_directory_name(tmp_path, raw, tiny_model_dir):
    """Non-ASCII, quotes and ': ' make YAML escape or quote a path; the spec must still
    point at the data file when it is located for lm-eval."""
    out = tmp_path / "résultats: l'évaluation" / ("long directory name " * 4).strip() / "topic"
    stage("eval_task_spec")(raw=raw["topic"], base=tiny_model_dir, spec=out, format="completion",
                            max_gen_tokens=4, task="topic")
    located_dir = located(out)
    spec = yaml.safe_load((located_dir / "qlora_topic.yaml").read_text(encoding="utf-8"))
    assert spec["dataset_kwargs"]["data_files"]["test"] == str((out / "test.jsonl").resolve())
    assert len(list(built_task(out, "qlora_topic").test_docs())) == len(
        read_jsonl(out / "test.jsonl"))


def test_task_spec_is_relocatable(tmp_path, specs):
    """A results/ folder moved (or mounted elsewhere) still evaluates: the spec stores no
    absolute path, so the moved copy reads the moved data."""
    import shutil

    moved = tmp_path / "elsewhere" / "topic"
    shutil.copytree(specs["topic"], moved)
    (moved / "test.jsonl").write_text("".join(
        line + "\n" for line in (moved / "test.jsonl").read_text().splitlines()[:2]))
    assert len(list(built_task(moved, "qlora_topic").test_docs())) == 2
    assert len(list(built_task(specs["topic"], "qlora_topic").test_docs())) > 2


def test_empty_test_split_is_refused(tmp_path, raw, tiny_tokenizer, tiny_model_dir):
    with pytest.raises(InputError, match="test split is empty"):
        tasks.write_task("t", [], "chat", tiny_tokenizer, tmp_path, 4)
    assert not list(tmp_path.iterdir())

    empty = tmp_path / "raw"
    empty.mkdir()
    for split in ("train", "validation"):
        (empty / f"{split}.jsonl").write_text((raw["arithmetic"] / f"{split}.jsonl").read_text())
    (empty / "test.jsonl").write_text("")
    out = tmp_path / "eval/tasks/empty"
    with pytest.raises(InputError, match="task 'empty'"):
        stage("eval_task_spec")(raw=empty, base=tiny_model_dir, spec=out, format="chat",
                                max_gen_tokens=4, task="empty")
    assert not out.exists()
    assert not out.parent.exists()  # no temporary left behind, nor a folder made for it


# ---- benchmarks ----------------------------------------------------------------------------

def test_unknown_benchmark_is_named(shared_index):
    with pytest.raises(InputError) as err:
        harness.check_benchmarks(["arc_easy", "no_such_task_xyz"])
    message = str(err.value)
    assert "no_such_task_xyz" in message and "lm-eval ls tasks" in message
    assert "arc_easy'" not in message  # only the unknown one is named
    harness.check_benchmarks(["arc_easy"])  # a known one passes


def test_no_benchmarks_skips_the_index(monkeypatch):
    import time

    import lm_eval.tasks

    def refuse(*args, **kwargs):
        raise AssertionError("no benchmark to check: lm-eval's index must not be built")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", refuse)
    started = time.perf_counter()
    assert harness.check_benchmarks([]) is None
    assert time.perf_counter() - started < 1


def test_unknown_benchmark_fails_before_any_model_loads(shared_index, monkeypatch, tmp_path,
                                                       specs, tiny_model_dir):
    def load_model(*args, **kwargs):
        pytest.fail("a model was loaded before the benchmarks were checked")

    monkeypatch.setattr(harness, "load_model", load_model)
    out = eval_outputs(tmp_path, "base", "arithmetic")
    with pytest.raises(InputError, match="no_such_task_xyz"):
        stage("evaluate")(spec=specs["arithmetic"], base=tiny_model_dir, seed=0, task="arithmetic",
                          variant="base", **out,
                          evaluation={**EVAL_CFG, "benchmarks": ["no_such_task_xyz"]})
    assert not out["results"].parent.exists()


# ---- model variants ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variant_paths(tmp_path_factory, tiny_model_dir, raw) -> dict:
    """Every variant's inputs built with the library: quantized base, adapter (random B),
    merged model."""
    from peft import LoraConfig, get_peft_model

    from qlora_pipeline.models.quantization import load_quantized

    root = tmp_path_factory.mktemp("variants")
    quant, adapter, merged = root / "quantized", root / "adapter", root / "merged"
    stage("quantize")(base=tiny_model_dir, quantized=quant, seed=0,
                      quantization={"method": "nf4", "double_quant": True,
                                    "compute_dtype": "auto", "skip_modules": ["lm_head"]})
    model = get_peft_model(load_quantized(quant, job_policy()), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    lora_b = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                lora_b[name] = param.detach().clone()
    model.save_pretrained(adapter)
    del model

    stage("tokenize")(raw=raw["arithmetic"], base=tiny_model_dir, tokenized=root / "tokenized",
                      format="chat",
                      tokenize={"max_length": 128, "train_on_prompt": False, "packing": False})
    stage("merge")(base=tiny_model_dir, quantized=quant, adapter=adapter,
                   tokenized=root / "tokenized", merged=merged, recovered=False,
                   merge={"base": "dequantized", "compare_bases": False, "check_examples": 2,
                          "max_shard_mb": 2048})
    return {"base": str(tiny_model_dir), "quantized": str(quant), "adapter": str(adapter),
            "merged": str(merged), "lora_b": lora_b}


def load(variant: str, paths: dict):
    """A variant loaded from the inputs its evaluation job gets (layout.variant_inputs)."""
    from qlora_pipeline.core.layout import variant_inputs

    names = set(variant_inputs(variant, "t")) - {"spec"}
    return harness.load_model(job_policy(), **{k: paths[k] for k in names})


def linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def loaded_lora_b(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}


def test_full_precision_variants(variant_paths):
    from peft import PeftModel

    base, tokenizer = load("base", variant_paths)
    assert not isinstance(base, PeftModel) and not base.training
    assert linear4bit_count(base) == 0
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    merged, _ = load("merged", variant_paths)
    assert not isinstance(merged, PeftModel) and linear4bit_count(merged) == 0
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # The adapter is in the weights: q_proj moved (v_proj too), the MLP did not (beyond
    # the dequantization the merge base carries, which is far smaller than a LoRA update).
    for name in ("q_proj", "v_proj"):
        gap = (getattr(merged.model.layers[0].self_attn, name).weight
               - getattr(base.model.layers[0].self_attn, name).weight).abs().max()
        assert gap > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)


def test_quantized_variants(variant_paths):
    from peft import PeftModel

    model4, _ = load("quantized", variant_paths)
    assert not isinstance(model4, PeftModel)
    # Every linear layer of the blocks is 4-bit (q, k, v, o, gate, up, down per layer).
    assert linear4bit_count(model4) == 7 * len(model4.model.layers)

    qlora, _ = load("qlora", variant_paths)
    assert isinstance(qlora, PeftModel) and not qlora.training
    assert linear4bit_count(qlora) == 7 * len(model4.model.layers)
    loaded = loaded_lora_b(qlora)
    assert loaded.keys() == variant_paths["lora_b"].keys()
    for name, value in variant_paths["lora_b"].items():
        torch.testing.assert_close(loaded[name], value)


def test_recovered_variant_is_the_adapter_on_the_full_precision_base(variant_paths):
    from peft import PeftModel

    recovered, _ = load("recovered", variant_paths)
    assert isinstance(recovered, PeftModel) and not recovered.training
    assert linear4bit_count(recovered) == 0
    loaded = loaded_lora_b(recovered)
    for name, value in variant_paths["lora_b"].items():
        torch.testing.assert_close(loaded[name], value)


# ---- end to end ----------------------------------------------------------------------------

@pytest.fixture
def batch_sizes(monkeypatch) -> list:
    """Records the batch size lm-eval's HF model wrapper (our subclass of it) is given."""
    from qlora_pipeline.evaluation import shared_context

    seen, real = [], shared_context.SharedContextLM

    class Recording(real):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("batch_size"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(shared_context, "SharedContextLM", Recording)
    return seen


def choice_accuracy(model_dir, docs: list[dict]) -> float:
    """Multiple-choice accuracy computed by hand: the choice of highest log-likelihood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for doc in docs:
        context = tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["prompt"] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]])
                              for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return right / len(docs)


@pytest.mark.parametrize("task,metric", [("arithmetic", "exact_match,strip"),
                                         ("topic", "acc,none")])
def test_evaluate_base_variant(tmp_path, specs, tiny_model_dir, batch_sizes, task, metric):
    outputs = eval_outputs(tmp_path, "base", task)
    out = outputs["results"]
    results = stage("evaluate")(spec=specs[task], base=tiny_model_dir, evaluation=EVAL_CFG,
                                seed=0, task=task, variant="base", **outputs)

    saved = json.loads(out.read_text())
    assert saved["variant"] == "base" and saved["task"] == task
    scores = saved["results"][f"qlora_{task}"]
    assert 0 <= scores[metric] <= 1
    assert saved["n-samples"][f"qlora_{task}"]["effective"] == EVAL_CFG["limit"]
    assert saved["results"] == json.loads(json.dumps(results["results"]))
    assert batch_sizes == [8]  # "auto" on the CPU
    if task == "topic":
        docs = read_jsonl(specs[task] / "test.jsonl")[: EVAL_CFG["limit"]]
        assert scores[metric] == pytest.approx(choice_accuracy(tiny_model_dir, docs))
    provenance = json.loads((out.parent / "provenance.json").read_text())
    assert provenance["stage"] == "evaluate"
    assert provenance["params"]["variant"] == "base"

    # Every scored example is kept, and its own score agrees with its response.
    samples = read_jsonl(out.parent / "samples.jsonl")
    assert len(samples) == EVAL_CFG["limit"]
    name = metric.split(",")[0]
    docs = read_jsonl(specs[task] / "test.jsonl")
    for row in samples:
        assert row["benchmark"] == f"qlora_{task}" and row["prompt"] == docs[row["doc_id"]]["prompt"]
        if task == "arithmetic":
            right = row["response"].strip().lower() == row["target"].strip().lower()
        else:
            assert row["target"] == docs[row["doc_id"]]["label"]
            right = row["response"] == row["target"]
            assert len(row["loglikelihoods"]) == len(docs[row["doc_id"]]["choices"])
        assert row[name] == float(right), row
    assert sum(row[name] for row in samples) / len(samples) == pytest.approx(scores[metric])
