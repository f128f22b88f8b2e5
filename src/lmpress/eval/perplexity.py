"""Perplexity under two documented protocols, both over the same scoring primitive.

- "llamacpp" (default): llama.cpp's perplexity tool. Non-overlapping windows of ctx tokens, each BOS
  followed by the next ctx-1 text tokens; the last ctx/2 - 1 predictions of each window are scored, so every
  scored token has at least ctx/2 tokens of context. Comparable with `llama-perplexity` figures.
- "stride": the sliding-window protocol of transformers' perplexity guide. Windows of ctx tokens advanced by
  `stride` (default ctx/2); each window scores only the tokens no earlier window scored, so every token but
  the first is scored exactly once.

perplexity = exp(mean negative log-likelihood over scored tokens); the ± is exp(mean) × the standard error
of the per-token NLL, as llama.cpp prints it.
"""

from __future__ import annotations

import math
import time

import torch

from ..data import llamacpp_windows, stride_windows, tokenize
from ..errors import BadInput
from . import progress_bar
from .scoring import window_logprobs

PROTOCOLS = ("llamacpp", "stride")


BOS_CHOICES = ("always", "auto", "never")


def window_bos(lm, bos: str = "always") -> int | None:
    """The token that opens each llama.cpp-protocol window: "always" the model's BOS (the issue's protocol, and
    shared/scripts/llamacpp-anchor.py); "auto" BOS only when the tokenizer adds one to a text of its own, as
    llama.cpp's llama-perplexity does (GGUF `tokenizer.ggml.add_bos_token`; false for SmolLM2 and Qwen2.5);
    "never" none. A model without a BOS id gets none."""
    from .tasks import prefix_bos_id

    if bos not in BOS_CHOICES:
        raise BadInput(f"bos must be one of {', '.join(BOS_CHOICES)}, got {bos!r}")
    if bos == "always":
        return lm.bos_id
    return prefix_bos_id(lm) if bos == "auto" else None


def make_windows(lm, ids: torch.Tensor, ctx: int, protocol: str = "llamacpp", stride: int | None = None,
                 limit: int | None = None, bos: str = "always"):
    if lm.max_positions is not None and ctx > lm.max_positions:
        raise BadInput(f"--ctx {ctx} exceeds {lm.name}'s limit of {lm.max_positions} positions")
    if protocol == "llamacpp":
        return llamacpp_windows(ids, ctx, window_bos(lm, bos), limit)
    if protocol == "stride":
        return stride_windows(ids, ctx, stride or ctx // 2, limit)
    raise BadInput(f"unknown perplexity protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")


def nll_stats(nll: torch.Tensor) -> dict:
    """perplexity and its ± from per-token negative log-likelihoods [N] (float64)."""
    n = nll.numel()
    mean = float(nll.mean())
    se = float(nll.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_stderr": ppl * se, "nll": mean, "tokens": n}


def perplexity(lm, text: str, ctx: int = 512, protocol: str = "llamacpp", stride: int | None = None,
               windows: int | None = None, batch_tokens: int = 2048, progress: bool = False,
               bos: str = "always") -> dict:
    """Perplexity of `lm` on `text`. Keys: perplexity, perplexity_stderr, nll, tokens (scored), windows,
    text_tokens, ctx, protocol, seconds, eval_tokens_per_s (tokens through the model per second). bos: what
    opens each llama.cpp-protocol window (window_bos)."""
    ids = tokenize(lm.tokenizer, text)
    wins = make_windows(lm, ids, ctx, protocol, stride, windows, bos)
    total = sum(len(w.ids) for w in wins)
    nll = []
    t0 = time.perf_counter()
    with progress_bar(total, f"perplexity {lm.name}", progress) as bar:
        for lp, tgt in window_logprobs(lm.model, wins, batch_tokens, bar):
            nll.append(-lp.gather(-1, tgt[:, None])[:, 0].double())
    secs = time.perf_counter() - t0
    return {**nll_stats(torch.cat(nll)), "windows": len(wins), "text_tokens": len(ids), "ctx": ctx,
            "protocol": protocol, "seconds": secs, "eval_tokens_per_s": total / secs}
