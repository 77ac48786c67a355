"""Scoring that fits free-text answers (the task key `scoring`, evaluation/tasks.py): lm-eval's
own filters and metrics, chosen per task and computed by lm-eval on canned answers; the
builtin tasks keep their metrics."""

from __future__ import annotations

import pytest
import yaml
from lm_eval.api.model import LM

from qlora_pipeline.config.schema import load_schema, validate
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.evaluation import harness, tasks

RECORDS = [{"prompt": "What is 40 + 2?\n", "completion": "42"},
           {"prompt": "Capital of France?\n", "completion": "Paris"},
           {"prompt": "What is 3 + 4?\n", "completion": "7"},
           {"prompt": "Say hello.\n", "completion": "Hello, world"}]
# What a chatty base model answers: right, but not in the form the target has.
ANSWERS = {"42": "The answer is 42.", "Paris": "paris!", "7": "7", "Hello, world": "hello world"}


class Canned(LM):
    """An lm-eval model that answers each prompt from ANSWERS (by the document's target).
    lm-eval's LM declares the log-likelihood methods abstract; a generation task never asks
    for them, so being asked is a test failure."""

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [ANSWERS[r.doc["answer"]] for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise AssertionError("a generation task asked for log-likelihoods")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise AssertionError("a generation task asked for rolling log-likelihoods")


def scoring(**settings) -> dict:
    """A task's scoring block with the schema's defaults."""
    task = {"format": "completion", "scoring": settings,
            "dataset": {"source": "builtin", "name": "arithmetic", "num_examples": 40}}
    return validate(task, load_schema("task.schema.yaml"), "test")["scoring"]


def score(tmp_path, tiny_tokenizer, settings: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    spec = tmp_path / "spec"
    spec.mkdir()
    info = tasks.write_task("free", RECORDS, "completion", tiny_tokenizer, spec, 8,
                            scoring(**settings))
    (tmp_path / "located").mkdir()
    located = harness.located_spec(spec, tmp_path / "located")
    out = lm_eval.simple_evaluate(model=Canned(), tasks=[info["name"]],
                                  task_manager=TaskManager(include_path=str(located),
                                                           include_defaults=False),
                                  bootstrap_iters=10)
    return out["results"][info["name"]]


def test_the_default_is_exact_match_as_before(tmp_path, tiny_tokenizer):
    """Strict but for case and trailing space: only "7" counts."""
    results = score(tmp_path, tiny_tokenizer, {})
    assert results["exact_match,strip"] == pytest.approx(1 / 4)


def test_exact_match_ignoring_punctuation(tmp_path, tiny_tokenizer):
    results = score(tmp_path, tiny_tokenizer, {"ignore_punctuation": True})
    # "paris!" and "hello world" now match; "The answer is 42." still does not
    assert results["exact_match,strip"] == pytest.approx(3 / 4)


def test_an_extract_pattern_takes_the_answer_out_of_a_sentence(tmp_path, tiny_tokenizer):
    results = score(tmp_path, tiny_tokenizer, {"extract": r"-?\d+"})
    # 42 and 7 are found; the words have no number, so they score 0
    assert results["exact_match,extract"] == pytest.approx(2 / 4)


def test_chrf_gives_partial_credit(tmp_path, tiny_tokenizer):
    results = score(tmp_path, tiny_tokenizer, {"metric": "chrf"})
    assert 0 < results["chrf,strip"] < 100
    assert "chrf_stderr,strip" in results


def test_scoring_is_validated_and_refused_for_choice_tasks(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="scoring.metric"):
        scoring(metric="rouge")
    with pytest.raises(InputError, match="scoring.extract"):
        scoring(extract="(unclosed")
    choices = [{"prompt": "Pick.\n", "choices": ["a", "b"], "label": 0}]
    with pytest.raises(InputError, match="multiple choice"):
        tasks.write_task("mc", choices, "completion", tiny_tokenizer, tmp_path,
                         8, scoring(metric="chrf"))


def test_the_builtin_tasks_keep_their_metrics(tmp_path, tiny_tokenizer):
    spec = tmp_path / "spec"
    spec.mkdir()
    tasks.write_task("free", RECORDS, "completion", tiny_tokenizer, spec, 8, scoring())
    written = yaml.safe_load((spec / "qlora_free.yaml").read_text())
    assert [m["metric"] for m in written["metric_list"]] == ["exact_match"]
    assert written["filter_list"][0]["name"] == "strip"
