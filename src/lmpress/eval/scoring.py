"""The one scoring primitive every evaluator uses: log-probabilities at chosen positions of a batch.

The model body runs once per batch; the output head (the most expensive matmul of a small model: 576×49152
for SmolLM2) runs only on the positions that are scored, never on the whole [B, T, V] tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from ..data import Window


def _head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """logits = the model's output head on hidden states, with the family's final scaling if it has one."""
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    if getattr(cfg, "logits_scaling", None):  # granite
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None) and cfg.model_type.startswith("cohere"):
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)  # gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logprobs_at(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """log_softmax of the next-token logits at `positions`.

    input_ids: [B, T]; positions: [B, K] indices into T. Returns [B, K, V] float32.
    Right padding needs no attention mask: a causal model never looks at later (pad) positions."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, D]
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, K, D]
    return F.log_softmax(_head(model, picked).float(), dim=-1)


def window_logprobs(model: torch.nn.Module, windows: list[Window], batch_tokens: int = 2048,
                    progress=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each window in order: (log-probs [n_targets, V] of each scored prediction, target ids [n_targets]).

    Windows of equal length and equal first target are batched (about `batch_tokens` tokens per forward pass);
    only one batch of log-probs exists at a time."""
    i = 0
    while i < len(windows):
        w0 = windows[i]
        bsz = max(1, batch_tokens // len(w0.ids))
        group = [w0]
        while (len(group) < bsz and i + len(group) < len(windows)
               and len(windows[i + len(group)].ids) == len(w0.ids)
               and windows[i + len(group)].first_target == w0.first_target):
            group.append(windows[i + len(group)])
        ids = torch.stack([w.ids for w in group])  # [B, T]
        pos = torch.arange(w0.first_target - 1, len(w0.ids) - 1).expand(len(group), -1)  # [B, K]
        # the inference-mode context must not stay open across a yield: a generator left suspended (e.g. by
        # zip) would leave it switched on for the whole thread
        with torch.inference_mode():
            lp = logprobs_at(model, ids, pos)
        for b, w in enumerate(group):
            yield lp[b], w.ids[w0.first_target:]
        if progress is not None:
            progress.update(sum(len(w.ids) for w in group))
        i += len(group)


def sequence_logprobs(model: torch.nn.Module, requests: Iterable[tuple[list[int], list[int]]],
                      batch_tokens: int = 4096, progress=None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log P(continuation | context), whether the continuation
    is the greedy choice at every step). Requests are sorted by length and right-padded into batches."""
    reqs = list(requests)
    order = sorted(range(len(reqs)), key=lambda k: -(len(reqs[k][0]) + len(reqs[k][1])))
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    i = 0
    with torch.inference_mode():
        while i < len(order):
            longest = len(reqs[order[i]][0]) + len(reqs[order[i]][1]) - 1  # the last token is never an input
            group = order[i:i + max(1, batch_tokens // max(longest, 1))]
            k_max = max(len(reqs[k][1]) for k in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long)
            pos = torch.zeros(len(group), k_max, dtype=torch.long)
            tgt = torch.zeros(len(group), k_max, dtype=torch.long)
            mask = torch.zeros(len(group), k_max, dtype=torch.bool)
            for b, k in enumerate(group):
                ctx, cont = reqs[k]
                seq = (ctx + cont)[:-1]
                ids[b, :len(seq)] = torch.tensor(seq)
                n = len(cont)
                pos[b, :n] = torch.arange(len(ctx) - 1, len(ctx) - 1 + n)
                tgt[b, :n] = torch.tensor(cont)
                mask[b, :n] = True
            lp = logprobs_at(model, ids, pos)  # [B, K, V]
            tok_lp = lp.gather(-1, tgt[..., None])[..., 0]  # [B, K]
            greedy = (lp.argmax(-1) == tgt) | ~mask
            for b, k in enumerate(group):
                out[k] = (float(tok_lp[b][mask[b]].double().sum()), bool(greedy[b].all()))
            if progress is not None:
                progress.update(len(group))
            i += len(group)
    return out  # type: ignore[return-value]
