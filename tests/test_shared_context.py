"""Log-likelihoods with each context computed once (evaluation/shared_context.py): the same
numbers and greedy flags as lm-eval's own path on four architectures, with continuations of
one and several tokens, padding and batching; models that break it are scored lm-eval's way."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import build_model
from lm_eval.models.huggingface import HFLM
from test_packing import ARCHS

from qlora_pipeline.evaluation import shared_context
from qlora_pipeline.evaluation.shared_context import SharedContextLM


def requests(tokenizer, contexts: int = 5, shared: int = 0) -> list:
    """lm-eval's tokenized requests: contexts of different lengths (with `shared`: all
    beginning with the same tokens, as a chat template makes them), each with four choices of
    one to three tokens (one repeated), as a multiple-choice task produces them."""
    generator = torch.Generator().manual_seed(1)
    vocab = len(tokenizer)
    beginning = torch.randint(3, vocab, (shared,), generator=generator).tolist()
    out = []
    for i in range(contexts):
        context = beginning + torch.randint(3, vocab, (6 + 3 * i,), generator=generator).tolist()
        choices = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (1, 1, 2, 3)]
        for choice in [*choices, choices[2]]:
            out.append(((f"c{i}", str(choice)), context, choice))
    return out


def both(model, tokenizer, reqs, **kwargs):
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, **kwargs)
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=2, **kwargs)
    return stock._loglikelihood_tokens(reqs), shared._loglikelihood_tokens(reqs), shared


@pytest.mark.parametrize("shared", [0, 8], ids=["own-contexts", "shared-beginning"])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loglikelihoods_as_lm_eval(tiny_tokenizer, arch, shared):
    model = build_model(len(tiny_tokenizer), 0, arch).eval()
    reqs = requests(tiny_tokenizer, shared=shared)
    stock, shared, lm = both(model, tiny_tokenizer, reqs)
    assert lm.scoring["shared_context"], lm.scoring
    assert len(shared) == len(reqs)
    for (loglik, greedy), (mine, my_greedy) in zip(stock, shared, strict=True):
        assert mine == pytest.approx(loglik, abs=1e-5)
        assert my_greedy == greedy


def test_one_row_per_context_and_the_head_only_where_read(tiny_tokenizer, monkeypatch):
    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    calls = []
    real = type(model).forward

    @functools.wraps(real)  # the signature stays the model's: logits_to_keep is passed
    def recording(self, *args, **kwargs):  # lm-eval's own path passes the ids alone
        out = real(self, *args, **kwargs)
        if "position_ids" in kwargs:
            calls.append((tuple(kwargs["input_ids"].shape), out.logits.shape[1]))
        return out

    monkeypatch.setattr(type(model), "forward", recording)
    reqs = requests(tiny_tokenizer, contexts=1)
    SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4)._loglikelihood_tokens(reqs)
    # the check's row is reused: one forward of one row, the context + 0 + 0 + 1 + 2 tokens,
    # the head at 1 + 1 + 2 positions (the last context token predicts every first token)
    assert calls == [((1, 6 + 3), 4)]


def test_a_model_that_ignores_the_mask_is_scored_the_stock_way(tiny_tokenizer, monkeypatch):
    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    forward = model.forward

    def plain_causal(input_ids, attention_mask=None, position_ids=None, **kwargs):  # no 4D mask
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", plain_causal)
    reqs = requests(tiny_tokenizer)
    stock, shared, lm = both(model, tiny_tokenizer, reqs)
    assert not lm.scoring["shared_context"]
    assert "differ from lm-eval's own path" in lm.scoring["reason"]
    assert shared == stock


def test_a_context_longer_than_the_model_is_left_to_lm_eval(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    reqs = requests(tiny_tokenizer)  # contexts of 6..18 tokens, rows up to 21
    stock, shared, lm = both(model, tiny_tokenizer, reqs, max_length=16)
    assert lm.scoring["shared_context"]
    for (loglik, greedy), (mine, my_greedy) in zip(stock, shared, strict=True):
        assert mine == pytest.approx(loglik, abs=1e-5) and my_greedy == greedy


def test_mask_isolates_choices_and_padding_sees_only_padding():
    # context of 3, choice 1 with 2 inputs, choice 2 with 1 input, then 2 padding
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    visible = shared_context.attention_mask(segments, torch.float32)[0, 0] == 0
    assert visible[2, :3].all() and not visible[2, 3:].any()  # context: causal
    assert visible[4].tolist() == [True] * 5 + [False] * 3  # choice 1 sees itself and the context
    assert visible[5].tolist() == [True] * 3 + [False, False, True, False, False]  # not choice 1
    assert visible[7].tolist() == [False] * 6 + [True, True]  # padding: only padding


def test_a_token_budget_sizes_the_batches_by_length(tiny_tokenizer, monkeypatch):
    """On a CPU ("auto") a batch holds as many rows as fit the budget: the same scores and
    generations as fixed batches of 2, in fewer forwards."""
    from lm_eval.api.instance import Instance

    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    reqs = requests(tiny_tokenizer)
    fixed = SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=2)
    budget = SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=2,
                             token_budget=64)
    sizes = []
    score_rows = shared_context.score_rows
    monkeypatch.setattr(shared_context, "score_rows",
                        lambda model, rows, *a: sizes.append([len(r) for r in rows])
                        or score_rows(model, rows, *a))
    expected = fixed._loglikelihood_tokens(reqs)
    sizes.clear()
    for (loglik, greedy), (mine, my_greedy) in zip(expected, budget._loglikelihood_tokens(reqs),
                                                   strict=True):
        assert mine == pytest.approx(loglik, abs=1e-5) and my_greedy == greedy
    # the check's two contexts, then the other three rows in one batch: 3 × 21 ≤ 64 tokens
    assert sizes == [[12, 9], [21, 18, 15]]

    prompts = [Instance("generate_until", {}, (f"{i} " * (3 + i), {"until": ["\n"],
                        "max_gen_toks": 4, "do_sample": False}), i) for i in range(6)]
    used = []
    generate = HFLM.generate_until
    monkeypatch.setattr(HFLM, "generate_until",
                        lambda self, r, d=False: used.append(self.batch_size) or generate(self, r, d))
    assert budget.generate_until(prompts) == fixed.generate_until(prompts)
    longest = max(len(budget.tok_encode(p.args[0])) for p in prompts)
    assert used == [max(1, min(6, 64 // (longest + 4))), 2]
    assert budget.batch_size == 2  # restored for lm-eval's own paths


def test_contexts_that_begin_alike_share_one_row(tiny_tokenizer, monkeypatch):
    """Five contexts after a common 8-token beginning: the check's two in one row, then the
    other three in one row (8 + their own tokens), split where a row would pass PACKED_TOKENS."""
    model = build_model(len(tiny_tokenizer), 0, "llama").eval()
    shapes = []
    real = type(model).forward

    @functools.wraps(real)
    def recording(self, *args, **kwargs):
        if "position_ids" in kwargs:
            shapes.append(tuple(kwargs["input_ids"].shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording)
    reqs = requests(tiny_tokenizer, shared=8)
    rows = list(shared_context.rows_of(reqs).values())
    own = [len(r) - 8 for r in rows]
    SharedContextLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=8)._loglikelihood_tokens(reqs)
    assert shapes == [(1, 8 + own[0] + own[1]), (1, 8 + sum(own[2:]))]
    monkeypatch.setattr(shared_context, "PACKED_TOKENS", 8 + own[0] + own[1] - 1)  # none pair
    assert len(shared_context.sequences(rows)) == len(rows)  # one context per row
    assert all(s["tokens"][:8] == list(rows[0].context[:8])
               for s in shared_context.sequences(rows))


def test_groups_keep_contexts_apart_after_the_shared_beginning():
    # shared 2 tokens; context A (group 1): 2 tokens + a choice of 1 input; context B (group
    # 2): 1 token; then padding
    segments = torch.tensor([[0, 0, 0, 0, 1, 0, -1]])
    groups = torch.tensor([[0, 0, 1, 1, 1, 2, -1]])
    visible = shared_context.attention_mask(segments, torch.float32, groups)[0, 0] == 0
    assert visible[4].tolist() == [True] * 5 + [False] * 2  # A's choice: beginning, A, itself
    assert visible[5].tolist() == [True, True, False, False, False, True, False]  # B: not A
    assert visible[6].tolist() == [False] * 6 + [True]
