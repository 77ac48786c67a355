"""A model's answer to a prompt, streamed as it is generated: a transformers model, or a GGUF
file in llama.cpp answering the same prompt text (what the chat command and the GGUF round
trip both ask of a model)."""

from __future__ import annotations

from ..core.errors import InputError


def _streamer(tokenizer, out):
    """transformers' TextStreamer (decodes whole words as they complete), into `out`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="\n" if stream_end else "", file=out, flush=True)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class LlamaCppModel:
    """A GGUF file in llama.cpp, answering like a transformers model does here: the prompt
    text in, tokenized by llama.cpp (special tokens parsed), streamed out to its EOS."""

    def __init__(self, path: str, threads: int, seed: int = 0):
        from .gguf_export import require_llama_cpp

        llama_cpp = require_llama_cpp("qlora-chat --gguf")
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads,
                                       verbose=False)
        except ValueError as err:  # llama.cpp's one word for a file it cannot load
            raise InputError(f"qlora-chat --gguf: {path}: {err}; expected a whole GGUF file "
                             f"(magic 'GGUF') of a model llama.cpp runs") from None
        self.seed = seed  # --sample: the same seed, the same answers

    def answer(self, prompt: str, settings: dict, out=None) -> str:
        sampled = {k: settings[k] for k in ("temperature", "top_p", "top_k")} \
            if settings["do_sample"] else {"temperature": 0.0}  # 0: llama.cpp's greedy sampler
        pieces = []
        for chunk in self.llm.create_completion(prompt, max_tokens=settings["max_new_tokens"],
                                                stream=True, seed=self.seed,
                                                **sampled):
            pieces.append(chunk["choices"][0]["text"])
            if out is not None:
                print(pieces[-1], end="", file=out, flush=True)
        if out is not None:
            out.write("\n")
        return "".join(pieces)


def answer(model, tokenizer, prompt: str, settings: dict, out=None) -> str:
    """The model's answer to `prompt`, streamed to `out` (a file) as it is generated."""
    import torch

    if isinstance(model, LlamaCppModel):
        return model.answer(prompt, settings, out)

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    streamer = _streamer(tokenizer, out) if out is not None else None
    # transformers' generate runs without gradients itself (@torch.no_grad(), through PEFT too)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            streamer=streamer, **settings)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
