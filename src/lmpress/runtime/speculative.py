"""Speculative decoding: a draft model proposes k tokens, the target checks them in one pass.

Each round, with the target's cache holding n tokens and `last` the newest token (not cached yet):
  1. the draft feeds whatever it has not seen yet, then proposes d1..dk (k one-token steps);
  2. the target runs [last, d1..dk] at positions n..n+k in ONE forward pass → its own choice g0..gk after
     each prefix;
  3. accept d1..da while d_i == g_{i-1}, then take g_a (the target's token where they first differ, or a
     bonus token when all k matched): a+1 new tokens for one target pass.
Every token that comes out is the target's own greedy choice given the tokens before it, so the output is
the target's greedy output. With sampling parameters (temperature > 0) step 3 is speculative sampling
(Leviathan et al. 2023; Chen et al. 2023): d_i drawn from the draft's distribution q is kept with
probability min(1, p(d_i)/q(d_i)), p the target's; at the first rejection the token is drawn from
max(p − q, 0) renormalized; after k acceptances the bonus token from p. Each output token is then distributed
exactly as sampling the target alone would draw it (not the same draws: the random stream differs).

Rolling back is free: both caches are positional, and a row's valid length is kept here (target: n + a + 1;
draft: what it fed that is still on the accepted path); the next call overwrites the rest.
"""

from __future__ import annotations

import time

import torch

from ..errors import BadInput, LmpressError
from .engine import Completion, Engine, Event, Sequence, Stream
from .sampling import SamplingParams, distribution, greedy_token, make_generator


def check_pair(target: Engine, draft: Engine) -> None:
    from ..models import check_same_tokenizer

    try:
        check_same_tokenizer(target.lm, draft.lm)
    except LmpressError:
        raise BadInput(f"draft {draft.lm.name} and target {target.lm.name} do not share one tokenizer and output "
                       f"size; speculative decoding needs a draft of the same family") from None


# Tokens the draft catches up on through decode steps (the fused native step for one row) rather than a prefill
# (the per-op path: ~15 calls per block), which only pays for longer runs such as the prompt.
FEED_BY_DECODE = 2


def speculative_events(target: Engine, draft: Engine, prompt, params: SamplingParams | None = None,
                       k: int = 4):
    """Events of one greedy generation of `target`, drafted by `draft` (row 0 of both engines' caches)."""
    params = params or SamplingParams()
    greedy = params.greedy
    if not isinstance(k, int) or k < 1:
        raise BadInput(f"draft k must be an integer >= 1, got {k!r}")
    check_pair(target, draft)
    ids = target.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    target.check_prompt(ids)
    T, D = target.runner, draft.runner
    max_len = min(T.max_len, D.max_len)
    seq = Sequence(0, ids, params, target)
    seq.max_len = max_len
    draft_gen = None if greedy else make_generator(
        SamplingParams(temperature=1.0, seed=None if params.seed is None else params.seed + 1), "cpu")

    def propose(logits: torch.Tensor):
        """The draft's token and the distribution it was drawn from (None when greedy)."""
        if greedy:
            return greedy_token(logits), None
        q = distribution(logits, params)
        return int(torch.multinomial(q, 1, generator=draft_gen)), q

    def verify(logits: torch.Tensor, d: int | None, q: torch.Tensor | None) -> int:
        """The target's token at this position, given the draft's proposal d (None after the last one)."""
        if greedy or d is None:
            return seq.sample(logits)
        p = distribution(logits, params, seq.seen)
        if float(torch.rand(1, generator=seq.generator)) * float(q[d]) < float(p[d]):
            return d  # kept with probability min(1, p/q)
        residual = (p - q).clamp_(min=0)
        return int(torch.multinomial(residual if residual.sum() > 0 else p, 1, generator=seq.generator))
    stats = {"draft": draft.lm.name, "draft_k": k, "proposed": 0, "accepted": 0, "target_passes": 0}

    def finish(ev: Event) -> Event:
        if ev.finished:
            ev.completion.stats = {**stats, "acceptance_rate": stats["accepted"] / max(stats["proposed"], 1),
                                   "tokens_per_target_pass": len(seq.tokens) / max(stats["target_passes"], 1)}
        return ev

    t0 = time.perf_counter()
    logits = T.prefill(torch.tensor([ids]))[0]
    seq.prefill_s = time.perf_counter() - t0
    seq.length = len(ids)
    stats["target_passes"] += 1
    ev = seq.accept(seq.sample(logits))
    yield finish(ev)
    if ev.finished:
        return
    history = ids + [seq.next_token]  # every token so far; the last one is in neither cache
    draft_len = 0  # tokens of `history` the draft's cache holds
    draft_logits = None  # the draft's logits tensor, written again by each of its decode steps
    while True:
        n = seq.length
        kk = max(0, min(k, max_len - 1 - n, params.max_tokens - len(seq.tokens) - 1))
        proposals: list[int] = []
        qs: list = []
        if kk:
            pending = history[draft_len:]
            if len(pending) <= FEED_BY_DECODE:  # the usual case: the last accepted token and the target's own
                for j, tok in enumerate(pending):
                    draft_logits = D.decode(torch.tensor([tok]), draft_len + j, out=draft_logits)
                d, q = propose(draft_logits[0].cpu())
            else:
                d, q = propose(D.prefill(torch.tensor([pending]), start=draft_len)[0].cpu())
            draft_len = len(history)
            proposals.append(d)
            qs.append(q)
            for _ in range(kk - 1):
                draft_logits = D.decode(torch.tensor([d]), draft_len, out=draft_logits)
                d, q = propose(draft_logits[0].cpu())
                draft_len += 1
                proposals.append(d)
                qs.append(q)
        logits = T.prefill(torch.tensor([[history[-1], *proposals]]), start=n, all_logits=True)[0].cpu()  # [kk+1, V]
        stats["target_passes"] += 1
        for i in range(kk + 1):
            tok = verify(logits[i], *((proposals[i], qs[i]) if i < kk else (None, None)))
            seq.length += 1  # the token fed at position n + i is now a valid part of the cache
            ev = seq.accept(tok)
            history.append(tok)
            match = i < kk and tok == proposals[i]
            stats["proposed"] += i < kk  # proposals checked (those after a stop are not)
            stats["accepted"] += match
            yield finish(ev)
            if ev.finished:
                return
            if not match:
                break
        draft_len = min(draft_len, seq.length)  # drop the draft's rejected proposals


def speculative_stream(target: Engine, draft: Engine, prompt, params: SamplingParams | None = None,
                       k: int = 4) -> Stream:
    return Stream(speculative_events(target, draft, prompt, params, k))


def speculative_generate(target: Engine, draft: Engine, prompt, params: SamplingParams | None = None,
                         k: int = 4) -> Completion:
    s = speculative_stream(target, draft, prompt, params, k)
    for _ in s:
        pass
    return s.completion
