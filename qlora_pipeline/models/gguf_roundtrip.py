"""Does an exported GGUF file hold the merged model? Two round trips, each against what the
merged model itself does on the task's test prompts (the prompts lm-eval scored):

- the importer's: the file read back by the pipeline's own GGUF importer (transformers'
  loader, models/importer.py): every tensor against the merged checkpoint's, and the logits;
- llama.cpp's: the file run by llama.cpp (llama-cpp-python), as a client runs it: its own
  tokenizer on the prompt text, greedy completion to EOS; the answers and the last-position
  logits against the merged model's.

A tensor further from the merged one than its GGUF type's rounding allows means a wrong
conversion (a transposed or permuted matrix, a lost tie), whatever the answers say: the job
fails (stages/export.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.files import read_jsonl

log = logging.getLogger(__name__)

# Largest relative error ‖W_gguf − W‖/‖W‖ of any tensor that a type's rounding explains, with
# room: f16 rounds each value to 2^-11 of itself, bf16 to 2^-8; the block types' bounds are
# at least twice what SmolLM2-135M measured (docs/serving.md). A wrong layout errs by ~1.
WEIGHT_BOUNDS = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2e-2, "q6_k": 5e-2,
                 "q5_0": 0.1, "q5_1": 0.1, "q5_k_s": 0.1, "q5_k_m": 0.1, "q4_0": 0.2,
                 "q4_1": 0.2, "q4_k_s": 0.2, "q4_k_m": 0.2, "q3_k_m": 0.35, "q2_k": 0.6}


@dataclass
class Reference:
    """What the merged model does on the prompts: token ids, greedy answers, last logits."""
    prompts: list[str]
    ids: list[list[int]]
    answers: list[str]
    logits: list[torch.Tensor] = field(repr=False)


def test_prompts(spec_dir: Path, examples: int) -> list[str]:
    """The first `examples` rendered prompts of the task's lm-eval test file."""
    path = Path(spec_dir) / "test.jsonl"
    if not path.is_file():
        raise InputError(f"export: {path} not found; expected the task's lm-eval test file "
                         f"(rule eval_task_spec)")
    return [record["prompt"] for record in read_jsonl(path)[:examples]]


def reference(model, tokenizer, prompts: list[str], max_new_tokens: int) -> Reference:
    """Greedy answers (to EOS) and last-position logits of the merged model."""
    from .generation import answer

    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None,
                "top_p": None, "top_k": None, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    ids, answers, logits = [], [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens], device=device)).logits
        ids.append(tokens)
        logits.append(out[0, -1].float().cpu())
        answers.append(answer(model, tokenizer, prompt, settings).strip())
    return Reference(prompts, ids, answers, logits)


def logit_gaps(found: list[torch.Tensor], ref: Reference) -> dict:
    """Largest last-position logit gap (absolute, and relative to the largest logit) and how
    often the top token is the same."""
    gap = max(float((f - r).abs().max()) for f, r in zip(found, ref.logits))
    scale = max(float(r.abs().max()) for r in ref.logits)
    same = sum(int(f.argmax() == r.argmax()) for f, r in zip(found, ref.logits))
    return {"max_abs_gap": gap, "max_rel_gap": gap / scale, "same_top_token": same / len(found)}


def importer_check(gguf_file: Path, merged_dir: Path, ref: Reference, gguf_type: str) -> dict:
    """The file read back by the pipeline's importer: per-tensor error against the merged
    checkpoint (worst tensor named) and the logits on the prompts."""
    from .checkpoint import Checkpoint
    from .importer import load

    try:
        model, _ = load({"source": "gguf", "path": str(gguf_file), "dtype": "float32"})
    except ValueError as err:
        # Only transformers' own refusal of an architecture its GGUF loader lacks (GPT-NeoX,
        # Phi-2...) is recorded as not checked; any other failure to read the file fails the job.
        if "is not supported yet" not in str(err):
            raise
        return {"checked": False, "why": f"transformers' GGUF loader: {err}"[:300]}
    state = model.state_dict()
    merged = Checkpoint(merged_dir)
    worst, worst_name = 0.0, None
    for name in merged.ordered_keys():
        if name not in state:
            raise RuntimeError(f"GGUF round trip: {gguf_file.name} read back has no tensor "
                               f"{name!r} of the merged model; the conversion lost it")
        want = merged.get(name).float()
        error = float((state[name].float() - want).norm() / want.norm().clamp_min(1e-12))
        if error > worst:
            worst, worst_name = error, name
    with torch.no_grad():
        found = [model(input_ids=torch.tensor([ids])).logits[0, -1].float() for ids in ref.ids]
    bound = WEIGHT_BOUNDS[gguf_type]
    return {"checked": True, "max_weight_rel_error": worst, "worst_tensor": worst_name,
            "bound": bound, "ok": worst <= bound, **logit_gaps(found, ref)}


def llama_cpp_check(gguf_file: Path, ref: Reference, max_new_tokens: int, threads: int) -> dict:
    """The file in llama.cpp: its tokens for each prompt, its greedy answer, its logits."""
    from .gguf_export import require_llama_cpp

    llama_cpp = require_llama_cpp("export.check.llama_cpp")
    context = max(map(len, ref.ids)) + max_new_tokens + 8
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=context, n_batch=context,
                          n_threads=threads, n_threads_batch=threads, logits_all=True,
                          seed=0, verbose=False)
    try:
        answers, same_tokens, found = [], 0, []
        for prompt, ids in zip(ref.prompts, ref.ids):
            # What a client sends: the text, tokenized by llama.cpp (BOS as the file says).
            # (create_completion's own rule, read where it reads it in llama-cpp-python 0.3.36)
            bos = [llm.token_bos()] if llm._model.add_bos_token() else []
            same_tokens += int(bos + llm.tokenize(prompt.encode(), add_bos=False,
                                                  special=True) == ids)
            llm.reset()
            done = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
            answers.append(done["choices"][0]["text"].strip())
            llm.reset()
            llm.eval(ids)  # the merged model's own tokens: the logits compare like for like
            found.append(torch.from_numpy(llm.scores[llm.n_tokens - 1].copy()))
    finally:
        llm.close()
    same = [a == r for a, r in zip(answers, ref.answers)]
    return {"checked": True, "prompts": len(answers), "same_tokens": same_tokens / len(answers),
            "same_answer": sum(same) / len(same), **logit_gaps(found, ref),
            "examples": [{"merged": r, "llama_cpp": a}
                         for a, r, s in zip(answers, ref.answers, same) if not s][:5]}
