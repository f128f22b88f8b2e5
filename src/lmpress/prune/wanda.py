"""Wanda (Sun, Liu, Bair & Kolter, 2023): prune by |W_ij| · ‖X_j‖₂, the weight's magnitude times the norm of
its input feature over the calibration tokens, and compare within each output row. No weight update.

Why the input norm: output i is Σ_j W_ij X_j, so a weight's contribution scales with its input; LLMs have a
few input features with very large activations, whose small weights magnitude pruning would wrongly remove.

Three pure functions for the sequential engine (calibrate.py):

    init_stats(module)          {"sq": Σ x_j² per input feature [I] float64, "n": rows seen}
    update_stats(stats, x)      x: [..., I], the layer's inputs
    apply(module, stats, cfg)   the same module, its pruned weights set to zero in place

cfg.sparsity: fraction pruned per output row (exactly floor(sparsity · I)); cfg.pattern "N:M": N kept of
every M consecutive inputs (sparsity then ignored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from .masks import apply_mask, check_sparsity, mask_for


def init_stats(module: torch.nn.Module) -> dict:
    w = linear_weight(module)
    return {"sq": torch.zeros(w.shape[1], dtype=torch.float64, device=w.device), "n": 0}


def update_stats(stats: dict, x: Tensor) -> dict:
    """x: [..., I]; adds Σ over rows of x² per feature (float32 squares, float64 sum)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, I]
    stats["sq"] += x.pow(2).sum(0).double()
    stats["n"] += x.shape[0]
    return stats


def input_norms(stats: dict) -> Tensor:
    """‖X_j‖₂ over every calibration row, [I] float32."""
    if stats["n"] == 0:
        raise BadInput("Wanda saw no calibration inputs for this layer")
    if not torch.isfinite(stats["sq"]).all():
        raise BadInput("Wanda: the layer's calibration inputs contain inf or NaN")
    return stats["sq"].sqrt().float()


def wanda_mask(w: Tensor, norms: Tensor, sparsity: float = 0.5, pattern: str | None = None) -> Tensor:
    """w [O, I], norms [I] → keep [O, I] from the scores |w| · norms."""
    if not torch.isfinite(w).all():
        raise BadInput("Wanda: the weight contains inf or NaN")
    return mask_for(w.detach().float().abs() * norms[None, :], sparsity, pattern)  # [O, I]


def apply(module: torch.nn.Module, stats: dict, config) -> torch.nn.Module:
    sparsity = check_sparsity(getattr(config, "sparsity", 0.5))
    keep = wanda_mask(linear_weight(module), input_norms(stats), sparsity, getattr(config, "pattern", None))
    return apply_mask(module, keep)
