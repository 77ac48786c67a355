"""Log-likelihood scoring with each context computed once.

lm-eval's HFLM scores every (context, continuation) pair as a sequence of its own: a four-way
multiple-choice question costs four forwards of the same prompt (one, when every choice is a
single token: its logits cache), and the output head and the softmax over the vocabulary run
at every position although only the continuation's are read. lm-eval leaves this open ("TODO:
implement some kind of efficient-request-middleware that lumps together requests with the same
context", `HFLM._loglikelihood_tokens`), so it is written here, at lm-eval's own extension
point (`_loglikelihood_tokens` of an HFLM subclass; everything else is lm-eval's):

- one row per context: the context, then every continuation's tokens but its last (the last is
  only predicted, never an input);
- a 4D attention mask in which the context is causal and each continuation sees the context
  and its own earlier tokens, not the other choices; position ids restart after the context,
  so each continuation is at the positions it has in lm-eval's own sequence;
- the output head only at the positions that predict a continuation token (transformers'
  `logits_to_keep`);
- where the contexts of a batch begin alike (a chat template, an instruction), several of
  them in one row after that beginning, computed once: each context sees it and itself, each
  continuation its own context (`segments.attention_mask`'s groups), rows of at most
  PACKED_TOKENS tokens (the attention grows with the square of a row's length).

The same sums of the same log-probabilities, computed in another order. `check` proves it on
the model at hand against lm-eval's own path before scoring: a model whose attention does not
take a custom 4D mask (flash-attention, flex) or that gives other numbers is scored lm-eval's
way, and results.json says which (`scoring`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from ..models import label_positions
from ..models.numerics import LOSS_TOLERANCE
from ..models.segments import CONTEXT, PAD, SHARED, attention_mask, mask_dtype

log = logging.getLogger(__name__)

CHECK_CONTEXTS = 2  # contexts scored both ways before the rest
SHARED_MIN = 4  # a shorter common beginning of a batch's contexts is not worth sharing
PACKED_TOKENS = 512  # longest row holding several contexts
# Segment ids: a row's context is CONTEXT, its continuation k is k + 1, padding PAD.


@dataclass
class Row:
    """One context with its distinct continuations, laid out as one sequence."""

    context: tuple[int, ...]
    continuations: list[tuple[int, ...]]

    def layout(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """(tokens, positions, segments, and per continuation the row indices whose logits
        predict each of its tokens): the context, then each continuation but its last token."""
        n = len(self.context)
        tokens, positions, segments, predicting = [*self.context], [*range(n)], [CONTEXT] * n, []
        for k, c in enumerate(self.continuations):
            predicting.append([n - 1, *range(len(tokens), len(tokens) + len(c) - 1)])
            tokens += c[:-1]
            positions += range(n, n + len(c) - 1)
            segments += [k + 1] * (len(c) - 1)
        return tokens, positions, segments, predicting

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def rows_of(requests) -> dict[tuple[int, ...], Row]:
    """lm-eval's tokenized requests ((strings), context, continuation) grouped by context."""
    continuations: dict[tuple[int, ...], dict] = {}  # a dict as an ordered set
    for _, context, continuation in requests:
        continuations.setdefault(tuple(context), {})[tuple(continuation)] = None
    return {context: Row(context, list(found)) for context, found in continuations.items()}


def sequences(rows: list[Row]) -> list[dict]:
    """The batch's rows as the sequences of a forward: each row alone, or, where their contexts
    begin alike, several rows after one copy of that beginning. Each sequence: tokens,
    positions, segments, groups, and per row the `predicting` indices of its continuations."""
    shared = _common_length([r.context for r in rows])
    if len(rows) < 2 or shared < SHARED_MIN:  # no beginning shared: each row a sequence alone
        shared = 0
    out: list[dict] = []
    for row in rows:
        if not out or not shared or (len(out[-1]["tokens"]) + len(row) - shared > PACKED_TOKENS
                                and out[-1]["rows"]):
            out.append({"tokens": list(row.context[:shared]), "positions": list(range(shared)),
                        "segments": [CONTEXT] * shared, "groups": [SHARED] * shared,
                        "rows": [], "predicting": []})
        seq = out[-1]
        start = len(seq["tokens"]) - shared  # where the row's own tokens go, less the prefix
        seq["rows"].append(row)
        *laid, predicting = row.layout()
        for name, values in zip(("tokens", "positions", "segments"), laid, strict=True):
            seq[name] += values[shared:]
        seq["groups"] += [len(seq["rows"])] * (len(row) - shared)
        seq["predicting"].append([[start + i for i in at] for at in predicting])
    return out


def _common_length(contexts) -> int:
    """Tokens every context begins with, leaving each at least one of its own (its last token
    predicts the continuations, so it must see only its own context)."""
    shortest = min(len(c) for c in contexts)
    return next((i for i in range(shortest - 1) if any(c[i] != contexts[0][i] for c in contexts)),
                max(shortest - 1, 0))


@torch.no_grad()
def score_rows(model, rows: list[Row], device, dtype) -> dict:
    """{(context, continuation): (log-likelihood, greedy)} for one batch of rows."""
    laid = sequences(rows)
    width = max(len(s["tokens"]) for s in laid)
    ids, positions, segments, groups = (  # one row per sequence, `fill` after its end
        torch.tensor([s[name] + [fill] * (width - len(s[name])) for s in laid])
        for name, fill in (("tokens", 0), ("positions", 0), ("segments", PAD), ("groups", PAD)))
    kept = sorted({p for seq in laid for per_row in seq["predicting"] for at in per_row
                   for p in at})
    column = {p: k for k, p in enumerate(kept)}
    arguments = {"input_ids": ids.to(device), "position_ids": positions.to(device),
                 "attention_mask": attention_mask(segments.to(device), dtype, groups.to(device)),
                 "use_cache": False}
    if label_positions.supported(model):
        arguments["logits_to_keep"] = torch.tensor(kept, device=device)
    logits = model(**arguments).logits
    if logits.shape[1] != len(kept):  # a model that computed every position
        logits = logits[:, kept]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    scores = {}
    for i, seq in enumerate(laid):
        for row, predicting in zip(seq["rows"], seq["predicting"], strict=True):
            for continuation, at in zip(row.continuations, predicting, strict=True):
                cols = torch.tensor([column[p] for p in at], device=logprobs.device)
                target = torch.tensor(continuation, device=logprobs.device)
                picked = logprobs[i, cols]
                scores[row.context, continuation] = (
                    float(picked.gather(1, target[:, None]).sum()),
                    bool((picked.argmax(dim=-1) == target).all()))
    return scores


class SharedContextLM(HFLM):
    """HFLM whose log-likelihood requests are scored one row per context (see the module).
    `token_budget`: batches of generation and shared scoring sized by length, as many rows as
    fit that many tokens (policy.CPU_EVAL_TOKENS); None: lm-eval's `batch_size` rows."""

    def __init__(self, *args, token_budget: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.scoring: dict | None = None  # how log-likelihoods were computed, once decided
        self._checked: dict = {}  # the check's own shared scores, not computed twice

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        fits = [r for r in rows_of(requests).values() if len(r) <= self.max_length]
        if self.backend != "causal" or not fits:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        if self.scoring is None:
            self.scoring = self.check(requests, fits[:CHECK_CONTEXTS])
            log.info("log-likelihood scoring: %s", self.scoring)
        if not self.scoring["shared_context"]:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        scores = self.score(fits, override_bs)
        # A context too long for one row is left to lm-eval (it truncates from the left).
        rest = [r for r in requests if (tuple(r[1]), tuple(r[2])) not in scores]
        if rest:
            scores.update(zip(((tuple(r[1]), tuple(r[2])) for r in rest),
                              super()._loglikelihood_tokens(rest, disable_tqdm, override_bs),
                              strict=True))
        answers = [scores[tuple(r[1]), tuple(r[2])] for r in requests]
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:  # as lm-eval: rolling windows carry no cache key
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def generate_until(self, requests, disable_tqdm: bool = False):
        """lm-eval's generation, in batches of as many requests as the token budget holds."""
        if not self.token_budget or not requests:
            return super().generate_until(requests, disable_tqdm)
        longest = max(len(self.tok_encode(r.args[0])) for r in requests)
        new = max(int(r.args[1].get("max_gen_toks", self.max_gen_toks)) for r in requests)
        saved = self.batch_size_per_gpu
        self.batch_size_per_gpu = max(1, min(len(requests), self.token_budget // (longest + new)))
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self.batch_size_per_gpu = saved

    def score(self, rows: list[Row], override_bs=None) -> dict:
        size = self.batch_size if isinstance(self.batch_size, int) else (
            override_bs or self._detect_batch_size())
        done = [r for r in rows if all((r.context, c) in self._checked for c in r.continuations)]
        scores = {(r.context, c): self._checked[r.context, c] for r in done for c in r.continuations}
        # similar lengths together: little padding
        rows = sorted((r for r in rows if r not in done), key=len, reverse=True)
        start = 0
        while start < len(rows):
            if self.token_budget:  # the first row of a batch is its longest
                size = max(1, self.token_budget // len(rows[start]))
            scores.update(score_rows(self.model, rows[start:start + size], self.device,
                                     mask_dtype(self.model)))
            start += size
        return scores

    def check(self, requests, rows: list[Row]) -> dict:
        """The first contexts scored both ways: shared rows are used only if every
        log-likelihood agrees within the logits' dtype tolerance and every greedy flag is equal."""
        contexts = {r.context for r in rows}
        sample = [r for r in requests if tuple(r[1]) in contexts]
        stock = super()._loglikelihood_tokens(sample, disable_tqdm=True)
        try:
            shared = self.score(rows)
        except (RuntimeError, ValueError, TypeError) as err:  # e.g. an attention without masks
            return {"shared_context": False, "reason": f"the model failed on a 4D mask: {err}"}
        tolerance = LOSS_TOLERANCE.get(mask_dtype(self.model), 1e-2)
        gap, greedy_equal = 0.0, True
        for request, (loglik, greedy) in zip(sample, stock, strict=True):
            mine, my_greedy = shared[tuple(request[1]), tuple(request[2])]
            gap = max(gap, abs(mine - loglik) / max(1.0, abs(loglik)))
            greedy_equal &= my_greedy == greedy
        result = {"checked_requests": len(sample), "max_relative_gap": gap, "tolerance": tolerance}
        if not gap <= tolerance or not greedy_equal:  # NaN included
            return {"shared_context": False, "reason": "log-likelihoods differ from lm-eval's "
                    f"own path (greedy flags equal: {greedy_equal})", **result}
        self._checked = shared
        return {"shared_context": True, **result}
