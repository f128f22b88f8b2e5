"""Magnitude pruning: zero the weights of smallest |W|, with no data. The baseline Wanda and SparseGPT are
measured against.

Unstructured, the comparison group is each output row (floor(sparsity · I) pruned per row), as for Wanda,
so the two differ only in their score; with a pattern "N:M", the smallest of each M consecutive inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from .masks import apply_mask, check_sparsity, mask_for


def magnitude_mask(w: Tensor, sparsity: float = 0.5, pattern: str | None = None) -> Tensor:
    """w [O, I] → keep [O, I]."""
    if not torch.isfinite(w).all():
        raise BadInput("magnitude pruning: the weight contains inf or NaN")
    return mask_for(w.detach().float().abs(), sparsity, pattern)


def prune_magnitude(mod: torch.nn.Module, step) -> torch.nn.Module:
    """Zero `mod`'s smallest weights in place per step.sparsity / step.pattern; returns `mod` (the per-layer
    function of compress's CONVERT table)."""
    sparsity = check_sparsity(getattr(step, "sparsity", 0.5))
    return apply_mask(mod, magnitude_mask(linear_weight(mod), sparsity, getattr(step, "pattern", None)))
