"""Masks: which weights to keep, from a score per weight (higher = more important). Pure tensor code.

A mask is a bool tensor [O, I], True = kept. Every function prunes an exact number of weights, the lowest
scores first; ties prune the lower column (or flat) index first (stable sorts), so masks are deterministic.

    row_mask(scores, sparsity)       floor(sparsity · I) pruned in every row       (Wanda, magnitude)
    global_mask(scores, sparsity|k)  floor(sparsity · numel), or k, pruned overall  (SparseGPT's blocks)
    nm_mask(scores, n, m)            n kept of every m consecutive columns of a row (2:4, 4:8)
    mask_for(scores, sparsity, pattern)   row_mask or nm_mask, as a step's config asks

N:M when m does not divide I: the last r = I mod m columns keep min(r, n) (the group is as if padded with
zero columns, which are pruned first), so every group, the partial one included, has at most n non-zeros.

Validation for step configs (recipe.py calls these): check_sparsity, parse_pattern.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..errors import BadInput

_PATTERN = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


# ------------------------------------------------------------------------------------------- validation

def check_sparsity(sparsity) -> float:
    """A sparsity as a float in [0, 1): 1 would prune everything."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise BadInput(f"sparsity must be a number in [0, 1) (the fraction of weights set to zero, e.g. 0.5), "
                       f"got {sparsity!r}")
    return float(sparsity)


def parse_pattern(pattern) -> tuple[int, int] | None:
    """None (unstructured) → None; "N:M" → (N, M) with 1 <= N < M: N weights kept in every M."""
    if pattern is None:
        return None
    m = _PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if m is None:
        raise BadInput(f"pattern must be 'N:M' (N weights kept in every M consecutive inputs, e.g. '2:4' or "
                       f"'4:8') or null for unstructured sparsity, got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise BadInput(f"pattern '{pattern}': N:M keeps N of every M weights, so it needs 1 <= N < M "
                       f"(e.g. '2:4', '4:8')")
    return n, mm


def n_pruned(sparsity: float, n: int) -> int:
    """floor(sparsity · n), robust to binary fractions (0.29 · 100 is 28.999…96 in floating point: 29)."""
    return min(n, math.floor(sparsity * n + 1e-6))


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise BadInput(f"expected scores of shape [out_features, in_features]; got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise BadInput("pruning scores contain inf or NaN (check the weight and the calibration inputs)")


# ------------------------------------------------------------------------------------------------ masks

def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask with the k lowest entries of each row of scores [R, c] pruned."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]  # ascending: lowest first
        keep.scatter_(-1, idx, False)
    return keep


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """scores [O, I] → keep [O, I]: the floor(sparsity · I) lowest of every row pruned."""
    _check_scores(scores)
    return _prune_lowest(scores, n_pruned(check_sparsity(sparsity), scores.shape[1]))


def global_mask(scores: Tensor, sparsity: float | None = None, k: int | None = None) -> Tensor:
    """scores [O, I] → keep [O, I]: the k (default floor(sparsity · numel)) lowest of all entries pruned."""
    _check_scores(scores)
    if k is None:
        k = n_pruned(check_sparsity(sparsity), scores.numel())
    if not 0 <= k <= scores.numel():
        raise BadInput(f"cannot prune {k} of {scores.numel()} weights")
    return _prune_lowest(scores.reshape(1, -1), k).reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """scores [O, I] → keep [O, I]: in every row, n kept of each m consecutive columns (the m − n lowest
    pruned); a partial last group of r columns keeps min(r, n)."""
    _check_scores(scores)
    if not 1 <= n < m:
        raise BadInput(f"N:M needs 1 <= N < M, got {n}:{m}")
    O, I = scores.shape
    full = I // m * m
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[:, :full] = _prune_lowest(scores[:, :full].reshape(O, I // m, m), m - n).reshape(O, full)
    r = I - full
    if r > n:
        keep[:, full:] = _prune_lowest(scores[:, full:], r - n)
    return keep


def mask_for(scores: Tensor, sparsity: float, pattern: str | None) -> Tensor:
    """The mask a step asks for: N:M when `pattern` is set (sparsity ignored), else per row."""
    nm = parse_pattern(pattern)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


# ------------------------------------------------------------------------------------ writing to layers

def _stored(mod: torch.nn.Module, w: Tensor) -> Tensor:
    """w [O, I] in the layout mod.weight stores (GPT-2's Conv1D: [I, O])."""
    return w.t() if type(mod).__name__ == "Conv1D" else w


def apply_mask(mod: torch.nn.Module, keep: Tensor) -> torch.nn.Module:
    """Zero the pruned weights of a linear layer in place (keep: [O, I] bool); returns the layer."""
    with torch.no_grad():
        mod.weight.mul_(_stored(mod, keep).to(mod.weight.dtype))
    return mod


def write_weight(mod: torch.nn.Module, w: Tensor) -> torch.nn.Module:
    """Overwrite a linear layer's weight in place with w [O, I] (cast to its dtype); returns the layer."""
    with torch.no_grad():
        mod.weight.copy_(_stored(mod, w))
    return mod
