"""qlora-chat on the finished tiny run: the variant loads as its scoring job loads it, the
prompt is the task's format, the streamed answer is the model's greedy answer, a chat keeps
its history, and bad requests are refused with a one-line message. Adapter folders carry the
base's tokenizer and generation files, and are checked against what vLLM's loader reads."""

from __future__ import annotations

import io
import json

import pytest

from conftest import job_policy
from qlora_pipeline import chat
from qlora_pipeline.models import generation
from qlora_pipeline.models import serving

QUESTION = "What is 2 + 3? Answer with the number only."


@pytest.fixture
def in_run(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    return tiny_run


def loaded(variant: str, task: str):
    from qlora_pipeline.evaluation.harness import load_model

    _, tasks = chat.run_settings("config/config.yaml")
    model, tokenizer = load_model(job_policy(), **chat.variant_paths(variant, task))
    return model, tokenizer, tasks[task]


@pytest.mark.parametrize("variant, task", [("merged", "arithmetic"), ("qlora", "topic"),
                                           ("recovered", "arithmetic"), ("base", "topic")])
def test_one_prompt_streams_the_variants_greedy_answer(in_run, capsys, variant, task):
    argv = ["--task", task, "--variant", variant, "--prompt", QUESTION, "--max-new-tokens", "6"]
    assert chat.main(argv) == 0
    streamed = capsys.readouterr().out
    model, tokenizer, settings = loaded(variant, task)
    prompt = chat.Conversation(settings, tokenizer).prompt(QUESTION)
    direct = generation.answer(model, tokenizer, prompt,
                         chat.generation_settings(chat.parse_args(argv), tokenizer))
    assert streamed.strip() == direct.strip()


def test_the_prompt_is_the_tasks_format(in_run):
    """chat task: the tokenizer's template with the task's system prompt, as training saw it;
    completion task: the prompt line as the builtin records render it."""
    _, tokenizer, arithmetic = loaded("base", "arithmetic")
    rendered = chat.Conversation(arithmetic, tokenizer).prompt(QUESTION)
    assert rendered == tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    _, _, topic = loaded("base", "topic")
    assert chat.Conversation(topic, tokenizer).prompt("Sentence: rain.") == "Sentence: rain.\n"


def test_a_chat_keeps_its_history_until_reset(in_run):
    model, tokenizer, task = loaded("merged", "arithmetic")
    conversation = chat.Conversation(task, tokenizer)
    settings = chat.generation_settings(chat.parse_args(["--task", "arithmetic",
                                                         "--max-new-tokens", "3"]), tokenizer)
    out = io.StringIO()
    chat.chat(model, tokenizer, conversation, settings, ["1 + 1?", "", "2 + 2?"], out)
    assert [m["role"] for m in conversation.history] == ["user", "assistant"] * 2
    assert "1 + 1?" in conversation.prompt("next") and out.getvalue()
    chat.chat(model, tokenizer, conversation, settings, ["/reset", "/exit", "never read"], out)
    assert conversation.history == []


def test_sampling_is_seeded(in_run, capsys):
    argv = ["--task", "topic", "--variant", "qlora", "--prompt", "Sentence: a goal.",
            "--sample", "--temperature", "1.5", "--max-new-tokens", "8", "--seed", "3"]
    answers = []
    for _ in range(2):
        assert chat.main(argv) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("argv, message", [
    (["--task", "sentiment"], "qlora-chat --task: found 'sentiment'"),
    (["--task", "topic", "--variant", "finetuned"], "qlora-chat --variant: variant 'finetuned'"),
    (["--task", "topic", "--variant", "recovered"], "results/adapters/topic/recovered not found"),
    (["--task", "topic", "--gguf", "topic.gguf"], "qlora-chat --gguf: topic.gguf not found"),
])
def test_bad_requests_are_refused_in_one_line(in_run, capsys, argv, message):
    assert chat.main(argv + ["--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_every_adapter_folder_carries_the_bases_tokenizer(in_run):
    """qlora, recovered, compressed and combined adapters: the base's chat template, EOS and
    pad tokens, and its generation_config.json, so that each loads and stops on its own."""
    from transformers import AutoTokenizer, GenerationConfig

    base = AutoTokenizer.from_pretrained("results/models/base")
    base_generation = GenerationConfig.from_pretrained("results/models/base")
    folders = ["results/adapters/arithmetic/qlora", "results/adapters/arithmetic/recovered",
               "results/adapters/topic/compressed", "results/adapters/combined/both",
               "results/models/merged/topic"]
    for folder in folders:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == base.chat_template, folder
        assert (tokenizer.eos_token, tokenizer.pad_token) == (base.eos_token, base.pad_token)
        generation = GenerationConfig.from_pretrained(folder)
        assert generation.eos_token_id == base_generation.eos_token_id, folder


def test_adapters_are_what_vllm_reads(in_run, tmp_path):
    """Trained adapters hold what vLLM's LoRA loader reads; per-module ranks (a compressed
    adapter's rank_pattern) would be scaled wrongly there and DoRA is refused: both said."""
    import shutil

    for folder in ("results/adapters/arithmetic/qlora", "results/adapters/topic/qlora",
                   "results/adapters/arithmetic/recovered", "results/adapters/combined/both"):
        assert serving.vllm_problems(folder) == [], folder
        assert serving.max_rank(folder) == json.loads(
            (in_run / folder / "adapter_config.json").read_text())["r"]
    source = in_run / "results/adapters/topic/qlora"
    config = json.loads((source / "adapter_config.json").read_text())
    for change, problem in [({"use_dora": True}, "use_dora: vLLM does not support DoRA"),
                            ({"rank_pattern": {"model.layers.0.self_attn.q_proj": 1}},
                             "rank_pattern: vLLM scales every module by lora_alpha/r; the 1 "
                             "modules it names would get the wrong scale"),
                            ({"modules_to_save": ["lm_head"]},
                             "modules_to_save: vLLM only supports it being None")]:
        folder = tmp_path / next(iter(change))
        shutil.copytree(source, folder)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert serving.vllm_problems(folder) == [problem]
