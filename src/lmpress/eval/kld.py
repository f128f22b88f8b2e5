"""KL divergence of a model to a base model, and top-1 agreement, on the perplexity windows.

KLD(base || model) per scored position = Σ_v p_base(v) · (log p_base(v) − log p_model(v)), averaged over all
scored positions — the figure llama.cpp's `--kl-divergence` reports per quantization type. Streaming: the
two models score one batch of windows at a time; only per-token numbers are kept, never the logits.
"""

from __future__ import annotations

import math
import time

import torch

from ..data import tokenize
from ..models import check_same_tokenizer
from . import progress_bar
from .perplexity import make_windows, nll_stats
from .scoring import window_logprobs


def _keeping(it, into: list):
    for item in it:
        into.append(item)
        yield item


def kl_divergence(lm, base, text: str, ctx: int = 512, protocol: str = "llamacpp", stride: int | None = None,
                  windows: int | None = None, batch_tokens: int = 2048, progress: bool = False,
                  base_cache: list | None = None, bos: str = "always") -> dict:
    """Keys: kld, kld_stderr, kld_median, kld_p99, kld_max, top1_agreement, perplexity (of lm),
    base_perplexity, tokens, windows, ctx, protocol, seconds.

    base_cache: for comparing several models to one base on the same windows (a benchmark table): an empty
    list is filled with the base's log-probabilities (all of them: windows × scored positions × vocabulary
    floats, e.g. 2 GB for 40 windows of SmolLM2 at ctx 512), a filled one is used instead of running the base.
    The caller keeps it tied to the same base, text and windows."""
    check_same_tokenizer(base, lm)
    ids = tokenize(lm.tokenizer, text)
    wins = make_windows(lm, ids, ctx, protocol, stride, windows, bos)
    total = sum(len(w.ids) for w in wins)
    klds, agree, nll, base_nll = [], [], [], []
    t0 = time.perf_counter()
    cached = base_cache is not None and len(base_cache) > 0
    with progress_bar(total if cached else 2 * total, f"kld {lm.name} vs {base.name}", progress) as bar:
        base_lps = iter(base_cache) if cached else window_logprobs(base.model, wins, batch_tokens, bar)
        if base_cache is not None and not cached:
            base_lps = _keeping(base_lps, base_cache)
        pairs = zip(window_logprobs(lm.model, wins, batch_tokens, bar), base_lps)
        for (lp, tgt), (blp, _) in pairs:
            klds.append((blp.exp() * (blp - lp)).sum(-1).double().clamp_min(0))
            agree.append(lp.argmax(-1) == blp.argmax(-1))
            nll.append(-lp.gather(-1, tgt[:, None])[:, 0].double())
            base_nll.append(-blp.gather(-1, tgt[:, None])[:, 0].double())
    kl = torch.cat(klds)
    n = kl.numel()
    return {
        "kld": float(kl.mean()),
        "kld_stderr": float(kl.std()) / math.sqrt(n) if n > 1 else float("nan"),
        "kld_median": float(kl.median()),
        "kld_p99": float(torch.quantile(kl, 0.99)) if n else float("nan"),
        "kld_max": float(kl.max()),
        "top1_agreement": float(torch.cat(agree).double().mean()),
        "perplexity": nll_stats(torch.cat(nll))["perplexity"],
        "base_perplexity": nll_stats(torch.cat(base_nll))["perplexity"],
        "tokens": n, "windows": len(wins), "ctx": ctx, "protocol": protocol,
        "seconds": time.perf_counter() - t0,
    }
