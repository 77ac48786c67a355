"""qlora-chat: talk to any variant of a finished run, in the task's prompt format.

    qlora-chat --task topic --variant merged                  # interactive, greedy
    qlora-chat --task topic --variant qlora --prompt "Sentence: ..."  # one answer
    qlora-chat --task arithmetic --variant recovered --sample --temperature 0.7
    qlora-chat --task topic --gguf results/models/gguf/topic/topic-q8_0.gguf  # in llama.cpp

A variant loads exactly as its scoring job loads it (layout.variant_inputs, then
evaluation/harness.load_model: the quantized base with its adapter, the full base with the
recovered adapter, the merged model, ...), so what you talk to is what was scored. The prompt is
the task's format (formats.prompt_text: the tokenizer's chat template for `chat` tasks, with
the task's system prompt; the Alpaca template; a raw completion prompt); tokens stream as they
are generated and generation stops at the tokenizer's EOS. In a chat task the conversation
carries over turns (`/reset` clears it); `/exit` or end of input ends the session.
With --gguf, an exported file (rule export_gguf) answers instead, run by llama.cpp
(llama-cpp-python) on the same prompt text: what a llama.cpp, Ollama or LM Studio user gets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .core import layout
from .core.errors import InputError
from .models.generation import LlamaCppModel, answer

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-chat", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="a task of the run (its prompt format)")
    parser.add_argument("--variant", default="merged",
                        help="base, quantized, qlora, compressed, recovered, merged, "
                             "<kind>+<task>, combined+<name> (default: %(default)s)")
    parser.add_argument("--gguf", help="a GGUF file (rule export_gguf) run by llama.cpp, "
                                       "instead of --variant")
    parser.add_argument("--config", default="config/config.yaml", help="the run's config")
    parser.add_argument("--prompt", help="answer this one prompt and exit (default: chat)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="for --sample")
    return parser.parse_args(argv)


def run_settings(config_path: str) -> tuple[dict, dict]:
    """(config, tasks) of the run, its results folder selected (config key `run`)."""
    from .config import load_config
    from .config.schema import load_yaml

    config, tasks = load_config(load_yaml(config_path), root=".")
    layout.use_run(config["run"])
    return config, tasks


def variant_paths(variant: str, task: str) -> dict[str, str]:
    """What the variant loads, each checked to exist (the run must have produced it)."""
    try:
        inputs = layout.variant_inputs(variant, task)
    except ValueError as err:
        raise InputError(f"qlora-chat --variant: {err}") from None
    inputs.pop("spec")
    missing = [path for path in inputs.values() if not Path(path).exists()]
    if missing:
        raise InputError(f"qlora-chat: {missing[0]} not found; expected the output of a "
                         f"finished run (make demo, or snakemake with this config)")
    return inputs


class Conversation:
    """The task's prompt format around the user's turns; a chat task keeps its history."""

    def __init__(self, task: dict, tokenizer):
        self.fmt, self.tokenizer = task["format"], tokenizer
        self.system = task["dataset"].get("system_prompt")
        self.history: list[dict] = []

    def prompt(self, text: str) -> str:
        from .data.formats import from_prompt_completion, prompt_text

        if self.fmt != "chat":  # one-shot formats: each turn stands alone
            return prompt_text(from_prompt_completion({"prompt": text, "completion": ""},
                                                      self.fmt), self.fmt, self.tokenizer)
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = [*system, *self.history, {"role": "user", "content": text},
                 {"role": "assistant", "content": ""}]
        return prompt_text({"messages": turns}, "chat", self.tokenizer)

    def answered(self, text: str, answer: str) -> None:
        if self.fmt == "chat":
            self.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": answer}]


def generation_settings(args: argparse.Namespace, tokenizer) -> dict:
    """model.generate's keywords: greedy unless --sample; stop at the tokenizer's EOS."""
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
            conversation.answered(text, answer(model, tokenizer, conversation.prompt(text),
                                               settings, out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        _, tasks = run_settings(args.config)
        if args.task not in tasks:
            raise InputError(f"qlora-chat --task: found {args.task!r}; expected one of the "
                             f"run's tasks {sorted(tasks)}")
        model, tokenizer = load(args)
    except InputError as err:
        print(err, file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(args.seed)  # --sample: the same seed, the same answers
    conversation = Conversation(tasks[args.task], tokenizer)
    settings = generation_settings(args, tokenizer)
    if args.prompt is not None:
        answer(model, tokenizer, conversation.prompt(args.prompt), settings, sys.stdout)
        return 0
    print(f"{args.gguf or args.variant} on {args.task} ({tasks[args.task]['format']} format). "
          f"/reset clears the conversation, /exit ends it.", file=sys.stderr)
    chat(model, tokenizer, conversation, settings, _prompts(), sys.stdout)
    return 0


def load(args: argparse.Namespace):
    """(model, tokenizer): the variant as scored, or the GGUF file in llama.cpp (the
    tokenizer, the base's, renders the task's prompts; llama.cpp tokenizes them itself)."""
    import torch
    from transformers import AutoTokenizer

    from .evaluation.harness import load_model
    from .core.policy import Policy

    if args.gguf is None:
        return load_model(Policy.detect(), **variant_paths(args.variant, args.task))
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
