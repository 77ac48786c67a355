"""qlora-chat on the finished tiny run: the variant loads as its scoring job loads it, the
prompt is the task's format, the streamed answer is the model's greedy answer, bounded by the
run's max_gen_tokens, a chat keeps its history, the run is the one its config files make, test
examples are shown and sent as scored, a prompt off the task's form gets a hint, and bad
requests are refused with a one-line message. Adapter folders carry the
base's tokenizer and generation files, and are checked against what vLLM's loader reads."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from conftest import job_policy, write_yaml
from qlora_pipeline import chat
from qlora_pipeline.config import variants
from qlora_pipeline.core import layout
from qlora_pipeline.core.files import read_jsonl
from qlora_pipeline.models import generation
from qlora_pipeline.models import serving

QUESTION = "What is 2 + 3? Answer with the number only."


@pytest.fixture
def in_run(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    return tiny_run


def loaded(variant: str, task: str):
    from qlora_pipeline.evaluation.harness import load_model

    _, tasks = chat.run_settings([])
    inputs = chat.finished(layout.variant_inputs(variant, task))
    inputs.pop("spec")
    model, tokenizer = load_model(job_policy(), **inputs)
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


def test_the_run_is_the_one_its_config_files_make(tiny_run, tmp_path, monkeypatch, capsys):
    """--configfile as snakemake's: files merged over config/config.yaml in order, so the last
    one's `run` opens results/<run>/ (here a link to the tiny run's results)."""
    shutil.copytree(tiny_run / "config", tmp_path / "config")
    (tmp_path / "results").mkdir()
    (tmp_path / "results/overlay").symlink_to(tiny_run / "results")
    write_yaml(tmp_path / "elsewhere.yaml", {"run": "elsewhere"})
    write_yaml(tmp_path / "overlay.yaml", {"run": "overlay"})
    monkeypatch.chdir(tmp_path)
    ask = ["--task", "topic", "--variant", "qlora", "--prompt", "x"]
    try:
        assert chat.main(["--configfile", "elsewhere.yaml", "overlay.yaml", *ask]) == 0
        assert chat.main(["--configfile", "overlay.yaml", "--configfile", "elsewhere.yaml",
                          *ask]) == 2
    finally:
        layout.use_run(None)
    assert "qlora-chat: results/elsewhere/eval/tasks/topic not found" in capsys.readouterr().err


def test_a_variant_the_task_lacks_is_refused_naming_its_own(in_run, capsys):
    """topic has no recovery; its own variants (config/variants.py, which the rules' scores
    use too) and other tasks' models (<kind>+<task>) are what it has."""
    assert chat.main(["--task", "topic", "--variant", "recovered", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (
        "qlora-chat --variant: found 'recovered'; expected one of topic's variants base, "
        "quantized, qlora, compressed, merged, qlora@r1, qlora@r2, combined+both, or another "
        "task's as <kind>+<task>[@<training>]\n")
    config, tasks = chat.run_settings([])
    asked = ["recovered+arithmetic", "merged+arithmetic", "qlora@r2", "combined+both",
             "recovered@r1", "compressed+arithmetic", "qlora+sentiment", "combined+none"]
    assert [v for v in asked if variants.made(v, "topic", tasks, config["combinations"])] \
        == asked[:4]


def test_an_example_is_sent_as_scored_and_its_answer_shown(in_run, capsys, monkeypatch):
    sent = []
    monkeypatch.setattr(chat, "answer", lambda model, tok, prompt, settings, out:
                        sent.append((prompt, settings["max_new_tokens"])))
    assert chat.main(["--task", "topic", "--variant", "qlora", "--example", "4"]) == 0
    example = read_jsonl(in_run / "results/eval/tasks/topic/test.jsonl")[4]
    assert sent == [(example["prompt"], 4)]  # the run's evaluation.max_gen_tokens
    assert capsys.readouterr().err.endswith(f"expected: {example['answer']}\n")


def test_generation_stops_at_the_runs_max_gen_tokens(in_run, capsys):
    """The tiny model answers a newline per token, never EOS: 4 tokens, then the stream's end."""
    assert chat.main(["--task", "arithmetic", "--variant", "base", "--prompt", QUESTION]) == 0
    model, tokenizer, task = loaded("base", "arithmetic")
    prompt = chat.Conversation(task, tokenizer).prompt(QUESTION)
    streamed = {}
    for limit in (4, 16):
        args = chat.parse_args(["--task", "arithmetic", "--max-new-tokens", str(limit)])
        generation.answer(model, tokenizer, prompt, chat.generation_settings(args, tokenizer),
                          out=streamed.setdefault(limit, io.StringIO()))
    assert capsys.readouterr().out == streamed[4].getvalue() != streamed[16].getvalue()


def test_a_prompt_off_the_tasks_form_gets_a_one_line_hint(in_run, capsys, monkeypatch):
    """At start a test prompt is shown; a turn that does not begin and end as every test prompt
    does gets one line naming the form and --example, then its (bounded) answer."""
    examples = read_jsonl(in_run / "results/eval/tasks/arithmetic/test.jsonl")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3? Answer with the number only."
                                                 "\nThe striker scored twice.\n"))
    assert chat.main(["--task", "arithmetic", "--variant", "qlora"]) == 0
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if line.startswith("qlora-chat:")]
    assert examples[0]["prompt"] in err and hints == [
        "qlora-chat: this prompt is not in the form of the task's test prompts, 'What is …? "
        "Answer with the number only.' (… varies); --example N sends test example N as scored"]
    sentence = "The striker scored twice in the second half."
    assert chat.main(["--task", "topic", "--variant", "qlora", "--prompt", sentence]) == 0
    assert "'Classify the topic of the sentence as one of: sports, food, weather, technology." \
           "\\nSentence: The ….\\nAnswer with the topic only.' (… varies)" in \
           capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "sentiment"], "qlora-chat --task: found 'sentiment'"),
    (["--task", "topic", "--variant", "finetuned"], "qlora-chat --variant: found 'finetuned'"),
    (["--task", "topic", "--gguf", "topic.gguf"], "qlora-chat --gguf: topic.gguf not found"),
    (["--task", "topic", "--example", "6"], "qlora-chat --example: found 6; expected 0 to 5 "
                                            "(topic's test examples)"),
    (["--task", "topic", "--config", "config/config.yaml"],
     "qlora-chat --config: found config/config.yaml; expected --configfile FILE"),
])
def test_bad_requests_are_refused_in_one_line(in_run, capsys, argv, message):
    assert chat.main(argv + ([] if "--example" in argv else ["--prompt", "x"])) == 2
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
    folder = tmp_path / "pissa"  # a weight-derived init's adapter: its converted/ is served
    shutil.copytree(source, folder)
    shutil.copytree(source, folder / "initial")
    assert serving.vllm_problems(folder) == [
        "initial/: trained from a LoftQ or PiSSA initialisation on a base of its own; on the "
        "original base serve converted/ (plain LoRA, rank 2r)"]
