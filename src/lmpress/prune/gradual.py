"""Magnitude masks over many layers (per-row, per-layer or one global threshold) and their schedule during
fine-tuning: fixed (an already pruned model keeps its zeros) or gradual (Zhu & Gupta, 2017).

Scopes, for a target sparsity s over the selected layers (exact counts, ties prune the lower index first):
  "row"     floor(s · I) smallest |w| of every output row (as prune/magnitude.py)
  "layer"   floor(s · O · I) smallest of each layer: one threshold per layer
  "global"  floor(s · Σ O·I) smallest over all layers together: one threshold for the model, so layers with
            small weights lose more (the comparison is meaningful only between layers of similar scale)

Gradual schedule (Zhu & Gupta, "To prune, or not to prune", 2017): sparsity at step t
    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (t1 − t0))³      for t0 <= t <= t1 (s_i before, s_f after)
with masks recomputed every `every` steps from the current weights (a weight pruned earlier stays at zero and
so is pruned again: masks only grow). Between updates, and after t1, the mask is applied after every
optimizer step, so pruned weights stay exactly zero while the others train.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from .masks import apply_mask, check_sparsity, global_mask, row_mask

SCOPES = ("row", "layer", "global")


def magnitude_masks(layers: dict[str, torch.nn.Module], sparsity: float, scope: str = "layer") -> dict[str, Tensor]:
    """Keep-masks [O, I] for each layer by |w|, with per-row, per-layer or one global threshold."""
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise BadInput(f"unknown sparsity scope '{scope}' (choose from {', '.join(SCOPES)})")
    scores = {name: linear_weight(mod).abs() for name, mod in layers.items()}
    if scope == "row":
        return {n: row_mask(s, sparsity) for n, s in scores.items()}
    if scope == "layer":
        return {n: global_mask(s, sparsity) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])[None]  # [1, N]: one threshold for all
    keep = global_mask(flat, sparsity).reshape(-1)
    out, pos = {}, 0
    for n, s in scores.items():
        out[n] = keep[pos:pos + s.numel()].reshape(s.shape)
        pos += s.numel()
    return out


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, end: int = 1) -> float:
    """Zhu & Gupta's cubic schedule: `initial` before `start`, `final` from `end` on, cubic in between."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


class MaskSchedule:
    """Masks applied to linear layers during fine-tuning.

    MaskSchedule.fixed(layers): the layers' current zeros, never changed (an already pruned model).
    MaskSchedule(layers, final=0.5, ...): gradual magnitude pruning to `final` on the cubic schedule."""

    def __init__(self, layers: dict[str, torch.nn.Module], final: float, initial: float = 0.0, start: int = 0,
                 end: int = 1, every: int = 1, scope: str = "layer"):
        self.layers = layers
        self.final, self.initial = check_sparsity(final), check_sparsity(initial)
        self.start, self.end, self.every, self.scope = start, max(end, start + 1), max(1, every), scope
        if scope not in SCOPES:
            raise BadInput(f"unknown sparsity scope '{scope}' (choose from {', '.join(SCOPES)})")
        self.masks: dict[str, Tensor] = {}
        self.gradual = True

    @classmethod
    def fixed(cls, layers: dict[str, torch.nn.Module], min_sparsity: float = 0.01) -> MaskSchedule:
        """Masks = the current non-zeros of layers at least `min_sparsity` sparse (others untouched)."""
        sched = cls({}, 0.0)
        sched.gradual = False
        for name, mod in layers.items():
            w = linear_weight(mod)
            if float((w == 0).float().mean()) >= min_sparsity:
                sched.layers[name] = mod
                sched.masks[name] = w != 0
        return sched

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final, self.initial, self.start, self.end)

    def update(self, step: int) -> None:
        """Recompute the masks when the schedule says so (gradual only), then apply them."""
        if self.gradual and (not self.masks or (self.start <= step <= self.end and (step - self.start) % self.every == 0)):
            self.masks = magnitude_masks(self.layers, self.sparsity_at(step), self.scope)
        self.apply()

    def apply(self) -> None:
        for name, keep in self.masks.items():
            apply_mask(self.layers[name], keep)

    def state(self) -> dict[str, Tensor]:
        return {f"mask.{n}": m.to(torch.uint8) for n, m in self.masks.items()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.masks = {k[len("mask."):]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
