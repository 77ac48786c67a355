"""qlora-chat: talk to any variant of a finished run, in the task's prompt format.

    qlora-chat --task topic --variant merged                  # interactive, greedy
    qlora-chat --task topic --example 3                       # test example 3, as scored
    qlora-chat --task arithmetic --variant qlora --prompt "What is 2 + 3?"  # one answer
    qlora-chat --task arithmetic --variant recovered --sample --temperature 0.7
    qlora-chat --configfile config/examples/promote-sweep.yaml --task arithmetic  # that run
    qlora-chat --task topic --gguf results/models/gguf/topic/topic-q8_0.gguf  # in llama.cpp

The run is the one snakemake makes of the same files: config/config.yaml, then each
--configfile in order (config.read_configfiles). A variant loads exactly as its scoring job
loads it (layout.variant_inputs, then evaluation/harness.load_model: the quantized base with its
adapter, the full base with the recovered adapter, the merged model, ...), so what you talk to
is what was scored; a variant the run does not make for the task is refused, naming the task's
own. The prompt is the task's format (formats.prompt_text: the tokenizer's chat template for
`chat` tasks, with the task's system prompt; the Alpaca template; a raw completion prompt). At
start a test example of the task is shown as the scorer renders it; a prompt that does not begin
and end as every test prompt does gets a one-line hint. Tokens stream as they are generated;
generation stops at the tokenizer's EOS or after the run's evaluation.max_gen_tokens (or
--max-new-tokens). In a chat task the conversation carries over turns (`/reset` clears it);
`/exit` or end of input ends the session. With --gguf, an exported file (rule export_gguf)
answers instead, run by llama.cpp (llama-cpp-python) on the same prompt text: what a llama.cpp,
Ollama or LM Studio user gets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .core import layout
from .core.errors import InputError
from .core.files import read_jsonl
from .models.generation import LlamaCppModel, answer

log = logging.getLogger(__name__)
MARK = "\x00"  # a turn's text, to find where the format's own text around it ends


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-chat", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="a task of the run (its prompt format)")
    parser.add_argument("--variant", default="merged",
                        help="one the run makes for the task: base, quantized, qlora, compressed,"
                             " recovered, merged, <kind>@<training>, combined+<name>, "
                             "<kind>+<task> (default: %(default)s)")
    parser.add_argument("--gguf", help="a GGUF file (rule export_gguf) run by llama.cpp, "
                                       "instead of --variant")
    parser.add_argument("--configfile", action="extend", nargs="+", default=[], metavar="FILE",
                        help="config files merged over config/config.yaml in order, as "
                             "snakemake's --configfile: the run to open")
    parser.add_argument("--config", nargs="+", help=argparse.SUPPRESS)  # refused: main()
    one = parser.add_mutually_exclusive_group()
    one.add_argument("--prompt", help="answer this one prompt and exit (default: chat)")
    one.add_argument("--example", type=int, metavar="N",
                     help="send the task's test example N as scored, show the expected answer")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int,
                        help="generation stops at the tokenizer's EOS or after this many tokens "
                             "(default: the run's evaluation.max_gen_tokens)")
    parser.add_argument("--seed", type=int, default=0, help="for --sample")
    return parser.parse_args(argv)


def run_settings(configfiles: list[str]) -> tuple[dict, dict]:
    """(config, tasks) of the run snakemake makes of config/config.yaml and `configfiles`, its
    results folder selected (config key `run`)."""
    from .config import load_config, read_configfiles

    config, tasks = load_config(read_configfiles(["config/config.yaml", *configfiles]),
                                root=".")
    layout.use_run(config["run"])
    return config, tasks


def check_request(args: argparse.Namespace, config: dict, tasks: dict) -> None:
    """The task and variant asked for are the run's."""
    from .config import variants

    if args.config is not None:
        raise InputError(f"qlora-chat --config: found {' '.join(args.config)}; expected "
                         f"--configfile FILE [FILE ...], the run's config files as snakemake "
                         f"takes them (its --config is KEY=VALUE)")
    if args.task not in tasks:
        raise InputError(f"qlora-chat --task: found {args.task!r}; expected one of the "
                         f"run's tasks {sorted(tasks)}")
    if args.gguf is None and not variants.made(args.variant, args.task, tasks,
                                               config["combinations"]):
        own = variants.of_task(args.task, tasks, config["combinations"])
        raise InputError(f"qlora-chat --variant: found {args.variant!r}; expected one of "
                         f"{args.task}'s variants {', '.join(own)}, or another task's as "
                         f"<kind>+<task>[@<training>]")


def finished(inputs: dict[str, str]) -> dict[str, str]:
    """The inputs, each checked to exist (the run must have produced it)."""
    missing = [path for path in inputs.values() if not Path(path).exists()]
    if missing:
        raise InputError(f"qlora-chat: {missing[0]} not found; expected the output of a "
                         f"finished run (make demo, or snakemake with these config files)")
    return inputs


def task_examples(spec: str, example: int | None, task: str) -> list[dict]:
    """The task's test examples as scored ({prompt, answer}: the lm-eval task's data, rendered
    by rule eval_task_spec), with --example N checked against them."""
    examples = read_jsonl(Path(spec) / "test.jsonl")
    if example is not None and not 0 <= example < len(examples):
        raise InputError(f"qlora-chat --example: found {example}; expected 0 to "
                         f"{len(examples) - 1} ({task}'s test examples)")
    return examples


class Conversation:
    """The task's prompt format around the user's turns; a chat task keeps its history."""

    def __init__(self, task: dict, tokenizer, examples: list[dict] = ()):
        self.fmt, self.tokenizer = task["format"], tokenizer
        self.system = task["dataset"].get("system_prompt")
        self.history: list[dict] = []
        self.shape = self.typed_shape([example["prompt"] for example in examples])

    def prompt(self, text: str, history: list[dict] | None = None) -> str:
        from .data.formats import from_prompt_completion, prompt_text

        if self.fmt != "chat":  # one-shot formats: each turn stands alone
            return prompt_text(from_prompt_completion({"prompt": text, "completion": ""},
                                                      self.fmt), self.fmt, self.tokenizer)
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = [*system, *(self.history if history is None else history),
                 {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return prompt_text({"messages": turns}, "chat", self.tokenizer)

    def answered(self, text: str, answer: str) -> None:
        if self.fmt == "chat":
            self.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": answer}]

    def typed_shape(self, prompts: list[str]) -> tuple[str, str]:
        """What a typed turn must begin and end with to render like every test prompt: the
        text the prompts share at both ends, less the format's own text around a turn (none
        from one prompt, which shares all of itself)."""
        if len(prompts) < 2:
            return "", ""
        start = os.path.commonprefix(prompts)  # compares any strings, not only paths
        end = os.path.commonprefix([p[len(start):][::-1] for p in prompts])[::-1]
        before, _, after = self.prompt(MARK, history=[]).partition(MARK)
        return (start[len(before):] if start.startswith(before) else "",
                end[:len(end) - len(after)] if end.endswith(after) else "")

    def hint(self, text: str) -> str | None:
        """One line when `text` does not begin and end as the task's test prompts do."""
        start, end = self.shape
        if text.startswith(start) and text.endswith(end):
            return None
        return (f"qlora-chat: this prompt is not in the form of the task's test prompts, "
                f"{start + '…' + end!r} (… varies); --example N sends test example N as scored")


def generation_settings(args: argparse.Namespace, tokenizer) -> dict:
    """model.generate's keywords: greedy unless --sample; stop at the tokenizer's EOS or after
    --max-new-tokens (main: else the run's evaluation.max_gen_tokens)."""
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
            # greedy: no sampling knobs, so transformers does not warn that they are ignored
            **(sampling if args.sample else dict.fromkeys(sampling))}


def chat(model, tokenizer, conversation: Conversation, settings: dict, lines, out) -> None:
    """Turns read from `lines` until /exit or their end; answers streamed to `out`."""
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            conversation.history = []
            continue
        if text:
            say(model, tokenizer, conversation, settings, text, out)


def say(model, tokenizer, conversation: Conversation, settings: dict, text: str, out) -> None:
    """One turn: a hint first where the text is off the task's format, then the answer."""
    hint = conversation.hint(text)
    if hint:
        print(hint, file=sys.stderr)
    conversation.answered(text, answer(model, tokenizer, conversation.prompt(text), settings,
                                       out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    from .config.trainings import own_base

    try:
        config, tasks = run_settings(args.configfile)
        check_request(args, config, tasks)
        tables = {name: task["trainings"] for name, task in tasks.items()}
        inputs = finished({"spec": layout.eval_spec(args.task)} if args.gguf
                          else layout.variant_inputs(args.variant, args.task,
                                                     own_base(tables, args.variant, args.task)))
        examples = task_examples(inputs.pop("spec"), args.example, args.task)
        model, tokenizer = load(args, inputs)
    except InputError as err:
        print(err, file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(args.seed)  # --sample: the same seed, the same answers
    conversation = Conversation(tasks[args.task], tokenizer, examples)
    if args.max_new_tokens is None:  # as the run's scoring generates
        args.max_new_tokens = config["evaluation"]["max_gen_tokens"]
    settings = generation_settings(args, tokenizer)
    if args.example is not None:
        answer(model, tokenizer, examples[args.example]["prompt"], settings, sys.stdout)
        print(f"expected: {examples[args.example]['answer']}", file=sys.stderr)
    elif args.prompt is not None:
        say(model, tokenizer, conversation, settings, args.prompt, sys.stdout)
    else:
        show_example(args, tasks[args.task]["format"], examples[0])
        chat(model, tokenizer, conversation, settings, _prompts(), sys.stdout)
    return 0


def show_example(args: argparse.Namespace, fmt: str, example: dict) -> None:
    print(f"{args.task}'s test example 0 as the scorer renders it ({fmt} format; --example N "
          f"sends example N):\n{example['prompt']}\nexpected: {example['answer']}\n\n"
          f"{args.gguf or args.variant} on {args.task}. /reset clears the conversation, /exit "
          f"ends it.", file=sys.stderr)


def load(args: argparse.Namespace, inputs: dict[str, str]):
    """(model, tokenizer): the variant as scored, or the GGUF file in llama.cpp (the
    tokenizer, the base's, renders the task's prompts; llama.cpp tokenizes them itself)."""
    import torch
    from transformers import AutoTokenizer

    from .evaluation.harness import load_model
    from .core.policy import Policy

    if args.gguf is None:
        return load_model(Policy.detect(), **inputs)
    if not Path(args.gguf).is_file():
        raise InputError(f"qlora-chat --gguf: {args.gguf} not found; expected a .gguf file "
                         f"(rule export_gguf writes results/models/gguf/<task>/<task>-<type>.gguf)")
    if not Path(layout.base()).is_dir():
        raise InputError(f"qlora-chat --gguf: {layout.base()} not found; expected the run's base "
                         f"(its tokenizer renders the task's prompts)")
    return (LlamaCppModel(args.gguf, torch.get_num_threads(), args.seed),
            AutoTokenizer.from_pretrained(layout.base()))


def _prompts():
    """Lines typed at a `> ` prompt (or piped in)."""
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


if __name__ == "__main__":
    sys.exit(main())
