"""SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth & Han, 2022): move the activation outliers of a linear layer's
inputs into its weights, so that int8 activations (W8A8) lose little. Also the smoothing groups and the exact
scale folding that AWQ (awq.py) shares.

A smoothing group is an op P whose output is, unchanged, the input of the linears L₁..Lₖ (ArchSpec names):

    attn_norm → q, k, v      (or GPT-2's fused qkv)
    v → o                    only when v's output channels are o's input channels one for one (no grouped-
                             query heads: attention mixes tokens, never channels, so o's input channel c is
                             v's output channel c)
    mlp_norm → gate, up      (or fc1)
    up → down                only in gated MLPs: down's input is act(gate(x)) ⊙ up(x), linear in each channel
                             of up (a plain act(fc1(x)) is not: GELU(x/s) ≠ GELU(x)/s)

With a positive per-channel s [I]: P's output is divided by s (a norm's weight and bias — Gemma's (1 + w)
weight included —, or the linear's output rows and bias) and every Lᵢ's input columns are multiplied by s:
Lᵢ(P(x)/s)·s = Lᵢ(P(x)) in real arithmetic, so the float model is unchanged up to rounding. A group is
skipped when P or a member is missing or already converted (not a float linear), and when a norm does not
scale as expected (checked on a probe). Nothing here sees the block's inputs, so whether the ArchSpec's norm
really is the op that feeds the projections (true of pre-norm families; Gemma2's post_attention_layernorm and
OLMo2's post-norms are not) is for the caller to check: the engine compares the block's output before and
after `prepare_block` on one calibration batch.

SmoothQuant for one group (the paper's eq. 4), from calibration statistics of the members' common input X:

    s_j = max|X_j|^α / max_i |W_ij|^(1−α)      (W: the selected members stacked along outputs)

α = 0.5 by default; α → 1 moves more of the activations' range into the weights. With alpha_search, each
group takes the α (from 0, 0.05, …, 1, or no smoothing at all) with the lowest W8A8 output error
Σ‖X·Wᵀ − q(X/s)·q(W·s)ᵀ‖² on a sample of its calibration inputs, where q is symmetric int8, per token for
activations and per output channel for weights. The step only smooths: the model stays float and is
mathematically unchanged; a following W8A8Dynamic or W8A8Static step quantizes it.

Functions for the sequential engine (calibrate.py):

    init_stats(module)                          {"amax": max|x| per input channel [I], "sample": rows [≤512, I], "n"}
    update_stats(stats, x)                      x: [..., I], the layer's inputs
    prepare_block(block, spec, stats, config)   smooth every group of the block in place (stats: {path: stats}
                                                of the selected linears; returns it, rescaled to the new inputs)
    apply(module, stats, config)                the module itself: smoothing leaves it float
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import is_float_linear, linear_weight

SAMPLE_ROWS = 512  # calibration input rows kept per layer for the α search
_ROWS_PER_BATCH = 128  # at most this many rows (evenly spaced) taken from one update
ALPHA_GRID = [i / 20 for i in range(21)]  # α candidates of the search
_EPS = 1e-5  # floor of max|X_j|, max|W_j| and s


# ------------------------------------------------------------------------------------ smoothing groups

@dataclass
class Group:
    """An op `prev` (a norm or a linear, at `prev_path` in the block) and the linears reading its output."""

    prev_path: str
    prev: torch.nn.Module
    members: dict[str, torch.nn.Module]  # path in the block -> float linear, execution order

    @property
    def prev_is_linear(self) -> bool:
        return is_linear(self.prev)


def is_linear(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def _find(spec, block, path):
    if path is None:
        return None
    try:
        return spec.get(block, path)
    except AttributeError:
        return None


def _in_features(mod) -> int:
    return linear_weight(mod).shape[1]


def smoothing_groups(block: torch.nn.Module, spec) -> list[Group]:
    """The block's foldable groups (module docstring), in execution order; unusable ones left out."""
    attn = [p for p in (spec.q, spec.k, spec.v, spec.qkv) if p]
    mlp = [p for p in (spec.gate, spec.up) if p]
    wanted = [(spec.attn_norm, attn)]
    if spec.v and not spec.qkv:
        wanted.append((spec.v, [spec.o]))
    wanted.append((spec.mlp_norm, mlp))
    if spec.gate:
        wanted.append((spec.up, [spec.down]))
    groups = []
    for prev_path, paths in wanted:
        prev = _find(spec, block, prev_path)
        members = {p: _find(spec, block, p) for p in paths}
        if prev is None or not members or any(m is None or not is_float_linear(m) for m in members.values()):
            continue
        width = {_in_features(m) for m in members.values()}
        if len(width) != 1:
            continue
        if is_linear(prev):
            if not is_float_linear(prev) or linear_weight(prev).shape[0] != width.pop():
                continue  # a converted layer, or grouped-query heads (v narrower than o's input)
        elif not isinstance(getattr(prev, "weight", None), Tensor) or prev.weight.shape != (width.pop(),):
            continue  # a norm without a per-channel weight to fold into
        same = [g for g in groups if g.prev is prev]
        if same:  # one norm feeding attention and MLP (parallel blocks): one group, one s
            if _in_features(next(iter(same[0].members.values()))) == _in_features(next(iter(members.values()))):
                same[0].members.update(members)
            continue
        groups.append(Group(prev_path, prev, members))
    return groups


# ------------------------------------------------------------------------------------------- folding

def _scale_inputs(mod: torch.nn.Module, s: Tensor) -> None:
    """Input columns of a linear × s (GPT-2's Conv1D stores W as [I, O]: its rows)."""
    w = mod.weight
    s = s.to(w.device, torch.float32)
    w.copy_(w.float() * (s[:, None] if type(mod).__name__ == "Conv1D" else s[None, :]))


def _scale_outputs(mod: torch.nn.Module, r: Tensor) -> None:
    """Output channels of a linear (weight rows and bias) × r."""
    w = mod.weight
    r = r.to(w.device, torch.float32)
    w.copy_(w.float() * (r[None, :] if type(mod).__name__ == "Conv1D" else r[:, None]))
    if getattr(mod, "bias", None) is not None:
        mod.bias.copy_(mod.bias.float() * r)


def _fold_into_norm(norm: torch.nn.Module, s: Tensor) -> bool:
    """norm(x) / s by changing the norm's weight (and bias): w/s, or ((1 + w)/s − 1) for a norm that scales by
    (1 + w) (Gemma). Each form is checked on a random probe; neither fits → the norm is restored, False."""
    w, b = norm.weight, getattr(norm, "bias", None)
    b = b if isinstance(b, Tensor) else None
    s = s.to(w.device, torch.float32)
    probe = (3 * torch.randn(8, s.numel(), generator=torch.Generator().manual_seed(0))).to(w.device, w.dtype)
    target = norm(probe).float() / s  # [8, I]
    tol = max(1e-4, 20 * torch.finfo(w.dtype).eps)
    w0, b0 = w.detach().float().clone(), None if b is None else b.detach().float().clone()
    for new in (w0 / s, (1 + w0) / s - 1):
        w.copy_(new)
        if b is not None:
            b.copy_(b0 / s)
        err = torch.linalg.vector_norm(norm(probe).float() - target)
        if err <= tol * torch.linalg.vector_norm(target):
            return True
    w.copy_(w0)
    if b is not None:
        b.copy_(b0)
    return False


def fold_scales(group: Group, s: Tensor) -> bool:
    """Divide the output of group.prev by s [I] and multiply every member's input columns by s, in place;
    False (nothing changed) when the prev op does not take the fold."""
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise BadInput(f"smoothing scales for {group.prev_path} must be finite and positive")
    with torch.no_grad():
        if group.prev_is_linear:
            _scale_outputs(group.prev, 1 / s)
        elif not _fold_into_norm(group.prev, s):
            return False
        for mod in group.members.values():
            _scale_inputs(mod, s)
    return True


# ----------------------------------------------------------------------------------- the three functions

def init_stats(module: torch.nn.Module) -> dict:
    i = linear_weight(module).shape[1]
    dev = module.weight.device
    return {"amax": torch.zeros(i, device=dev), "sample": torch.zeros(0, i, device=dev), "n": 0}


def update_stats(stats: dict, x: Tensor) -> dict:
    """x: [..., I]. amax: running max|x| per channel. sample: up to _ROWS_PER_BATCH evenly spaced rows of each
    batch; beyond SAMPLE_ROWS every other row is dropped, so the sample stays spread over all batches."""
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, I]
    if x.shape[0] == 0:
        return stats
    stats["amax"] = torch.maximum(stats["amax"], x.abs().amax(dim=0))
    idx = torch.linspace(0, x.shape[0] - 1, min(_ROWS_PER_BATCH, x.shape[0]), device=x.device).round().long()
    sample = torch.cat([stats["sample"], x[idx]])
    while sample.shape[0] > SAMPLE_ROWS:
        sample = sample[::2]
    stats["sample"], stats["n"] = sample, stats["n"] + x.shape[0]
    return stats


def check_config(config) -> tuple[float, bool]:
    alpha, search = getattr(config, "alpha", 0.5), getattr(config, "alpha_search", False)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise BadInput(f"SmoothQuant alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(search, bool):
        raise BadInput(f"SmoothQuant alpha_search must be true or false, got {search!r}")
    return float(alpha), search


def smoothing_scales(amax: Tensor, wmax: Tensor, alpha: float) -> Tensor:
    """s = max|X|^α / max|W|^(1−α) per input channel, floored at 1e-5 (dead channels stay finite)."""
    return (amax.clamp_min(_EPS).pow(alpha) / wmax.clamp_min(_EPS).pow(1 - alpha)).clamp_min(_EPS)


def _int8_rows(t: Tensor) -> Tensor:
    """Symmetric int8 fake quantization, one scale per row (tokens of X, output channels of W)."""
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(t / scale), -127, 127) * scale


def w8a8_error(x: Tensor, weights: list[Tensor], s: Tensor | None) -> float:
    """Σ_W ‖x·Wᵀ − q(x/s)·q(W·s)ᵀ‖² (s None: no smoothing). x: [n, I], W: [O, I]."""
    xq = _int8_rows(x if s is None else x / s)
    err = 0.0
    for w in weights:
        wq = _int8_rows(w if s is None else w * s)
        err += float((xq @ wq.t() - x @ w.t()).double().pow(2).sum())
    return err


def _search(x: Tensor, amax: Tensor, weights: list[Tensor], wmax: Tensor) -> tuple[Tensor | None, float | None]:
    """(scales, α) with the lowest W8A8 error on x among no smoothing (None, None) and every α of ALPHA_GRID."""
    best_err, best = w8a8_error(x, weights, None), (None, None)
    for alpha in ALPHA_GRID:
        s = smoothing_scales(amax, wmax, alpha)
        err = w8a8_error(x, weights, s)
        if err < best_err:
            best_err, best = err, (s, alpha)
    return best


def prepare_block(block: torch.nn.Module, spec, stats: dict, config) -> dict:
    """Smooth each group of `block` (smoothing_groups) whose members the step selected (stats: {path in the
    block: stats} of those) in place; returns stats with "amax" and "sample" rescaled to the smoothed inputs,
    and "alpha" (None: not smoothed) per smoothed layer."""
    alpha, search = check_config(config)
    with torch.no_grad():
        for group in smoothing_groups(block, spec):
            sel = [p for p in group.members if p in stats]
            if not sel:
                continue
            st = stats[sel[0]]  # the members share one input: any member's statistics are the group's
            if st["n"] == 0:
                raise BadInput(f"{sel[0]}: SmoothQuant saw no calibration inputs")
            if not torch.isfinite(st["amax"]).all():
                raise BadInput(f"{sel[0]}: the calibration inputs contain inf or NaN")
            weights = [linear_weight(group.members[p]) for p in sel]  # [O, I] each
            wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)  # [I]
            if search:
                s, chosen = _search(st["sample"], st["amax"], weights, wmax)
            else:
                s, chosen = smoothing_scales(st["amax"], wmax, alpha), alpha
            if s is None or not fold_scales(group, s):
                continue
            for p in sel:
                stats[p] = {**stats[p], "amax": stats[p]["amax"] / s, "sample": stats[p]["sample"] / s,
                            "alpha": chosen}
    for p in stats:  # apply refuses statistics that never went through here (an engine without prepare_block)
        stats[p] = {**stats[p], "prepared": True}
    return stats


def apply(module: torch.nn.Module, stats: dict, config) -> torch.nn.Module:
    """Smoothing leaves the layer float: the module itself (a later step quantizes it)."""
    check_config(config)
    if not stats.get("prepared"):
        raise BadInput("SmoothQuant's statistics were not prepared: the engine must call smoothquant.prepare_block "
                       "on each block before apply (calibrate.run_sequential does)")
    return module
