"""AWQ, activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan & Han, 2023): a few input
channels carry large activations, and their weights matter most. Scaling those columns up before rounding
(W·diag(s)) and the inputs down by the same factor (X·diag(1/s), folded into the op before) shrinks their
relative rounding error; the scale is searched per group of linears that share an input, on calibration
statistics, and the weights are then stored as RTN codes of the scaled weight (PackedLinear).

For one smoothing group (the linears reading one op's output, smoothquant.smoothing_groups: attn_norm → q/k/v,
v → o where heads allow, mlp_norm → gate/up, up → down), with X the group's calibration inputs:

    m_j = mean|X_j|                                   per input channel (floored at 1e-4)
    s(α) = m^α / sqrt(max(m^α) · min(m^α))             α = i / grid, i = 0 .. grid − 1 (α = 0: s = 1, RTN)
    err(α) = Σ_W ‖X·Wᵀ − (X/s)·Q(W·s)ᵀ‖² = Σ_W tr(D·H·Dᵀ),  D = W − Q(W·s)/s,  H = XᵀX / n

Q is min-max asymmetric RTN with `group_size` groups along the input (fp16 parameters, as stored).
duo_scaling=True searches AutoAWQ's default family instead, s(α) = m^α / w^(1−α) with w_j the mean over the
group's rows of |W_rj| / max|W| of its quantization group, after s = 1 (RTN) itself; on SmolLM2-135M (W4 g128,
builtin calibration, 40 windows) it was worse than the activation-only family: KLD 0.2189 against 0.1949
(calibrated.md), hence off by default. The α of the lowest error wins (so on its calibration objective AWQ
is never worse than RTN); every group of a block is searched on the float block first, then all scales are
folded (smoothquant.fold_scales), as the reference implementation does. The objective is the group's own
outputs (not the attention or MLP output): it needs only the Gram matrix H, which also serves the clip
search, and is exact over every calibration token.

Clipping (clip=True): for each output row and weight group of a scaled layer, the range [lo, hi] is shrunk to
[lo·f, hi·f] (f from 1 down to 0.5, 20 steps) and the f with the lowest output error of the row, d·H·dᵀ
(H: the scaled inputs' Gram matrix, cross terms with the row's other groups included; one greedy pass over
the groups), is kept; f = 1 is tried first and kept on ties. (The reference implementation scores each
group alone, d_g·H_gg·d_gᵀ; with the cross terms, stories260K's KLD at W3 g32 is 5% lower, at no real
cost.) Not for q and k (nor a fused qkv): their outputs meet in a product, where output MSE is a poor guide
(as in the reference implementation).

Measured on stories260K, W4 g32, calibration 16 × 128 tokens sampled from the model: KLD to float on
stories' own story text 0.024 (RTN 0.054, GPTQ 0.029); on 32 × 256 held-out sampled tokens 0.063 (RTN 0.087,
GPTQ 0.060); W3 g32 there 0.39 (RTN 0.56, GPTQ 0.37).

Functions for the sequential engine (calibrate.py):

    init_stats(module)                          {"H": Σ xᵀx [I, I] float64, "absum": Σ|x| [I] float64, "n"}
    update_stats(stats, x)                      x: [..., I], the layer's inputs
    prepare_block(block, spec, stats, config)   search and fold the scales of every group of the block in place;
                                                returns stats rescaled to the layers' new inputs (X/s)
    apply(module, stats, config)                a PackedLinear: RTN codes (clipped when config.clip) of the
                                                (scaled) weight; with config.scale_only the float module itself,
                                                for a later quantizer (e.g. [AWQ(scale_only=True), GPTQ])

Memory: H is I² float64 per layer, as for GPTQ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from ..nn.packed import PackedLinear, pad_to_groups
from .gptq import add_gram
from .primitives import QParams, check_bits, compute_qparams, dequantize, quantize
from .rtn import storage_qparams
from .smoothquant import fold_scales, smoothing_groups

CLIP_GRID, CLIP_MIN = 20, 0.5  # clip factors: linspace(1, CLIP_MIN, CLIP_GRID)
_MEAN_FLOOR = 1e-4  # floor of mean|X_j| (a dead channel would give s = 0)


def check_config(config) -> tuple[int, int | None, int, bool]:
    bits = check_bits(getattr(config, "bits", 4))
    group_size = getattr(config, "group_size", 128)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise BadInput(f"AWQ group_size must be a positive integer or None (per output channel), got {group_size!r}")
    grid = getattr(config, "grid", 20)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise BadInput(f"AWQ grid (number of α values searched in [0, 1)) must be an integer >= 1, got {grid!r}")
    clip = getattr(config, "clip", True)
    if not isinstance(clip, bool):
        raise BadInput(f"AWQ clip must be true or false, got {clip!r}")
    return bits, group_size, grid, clip


# ----------------------------------------------------------------------------------------- statistics

def init_stats(module: torch.nn.Module) -> dict:
    i = linear_weight(module).shape[1]
    dev = module.weight.device
    return {"H": torch.zeros(i, i, dtype=torch.float64, device=dev),
            "absum": torch.zeros(i, dtype=torch.float64, device=dev), "n": 0}


def update_stats(stats: dict, x: Tensor) -> dict:
    """x: [..., I]; H += xᵀx (float32 product, float64 sum), absum += Σ|x| per channel."""
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, I]
    add_gram(stats["H"], x)
    stats["absum"] += x.abs().sum(dim=0).double()
    stats["n"] += x.shape[0]
    return stats


def gram(stats: dict) -> Tensor:
    """H = XᵀX / n, float32 [I, I]."""
    if stats["n"] == 0:
        raise BadInput("AWQ saw no calibration inputs for this layer")
    H = stats["H"] / stats["n"]
    if not torch.isfinite(H).all():
        raise BadInput("AWQ: the layer's calibration inputs contain inf or NaN")
    return H.float()


# ----------------------------------------------------------------------------------------- the search

def fake_rtn(w: Tensor, bits: int, group_size: int | None) -> Tensor:
    """w [O, I] → its RTN (min-max, fp16 parameters) dequantized values [O, I]; a partial last group padded."""
    i = w.shape[1]
    wp = pad_to_groups(w, group_size)
    qp = storage_qparams(compute_qparams(wp, bits, group_size, symmetric=False))
    return dequantize(quantize(wp, qp), qp)[:, :i]


def output_error(d: Tensor, H: Tensor) -> float:
    """tr(D·H·Dᵀ) = ‖X·Dᵀ‖² / n for D [O, I], H = XᵀX / n [I, I]."""
    return float(((d @ H) * d).sum())


def scale_for(mean: Tensor, alpha: float, wmean: Tensor | None = None) -> Tensor:
    """mean^α normalized (max·min = 1); with wmean (duo scaling) mean^α / wmean^(1−α)."""
    s = mean.clamp_min(_MEAN_FLOOR).pow(alpha)
    if wmean is not None:
        s = (s / (wmean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_magnitude(weights: list[Tensor], group_size: int | None) -> Tensor:
    """Mean over the group's output rows of |w| / max|w| of its quantization group, per input channel [I]:
    the weight side of duo scaling (AutoAWQ's w_mean)."""
    w = torch.cat(weights)  # [O, I]
    wp = pad_to_groups(w, group_size).abs()
    g = group_size or wp.shape[1]
    wg = wp.reshape(wp.shape[0], -1, g)
    return (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(wp.shape)[:, :w.shape[1]].mean(dim=0)


SLICE = 2**21  # elements of the weight slices of scaled_rtn_error (8 MB of float32)


def scaled_rtn_error(w: Tensor, s: Tensor, H: Tensor, bits: int, group_size: int | None, slice_: int = SLICE) -> float:
    """tr(D·H·Dᵀ) of D = w − Q(w·s)/s, summed over slices of whole output rows of about `slice_` elements:
    RTN groups run along the input, so rows are independent, and each slice's temporaries (w·s, its codes,
    D, D·H) stay below the 16 MB from which glibc serves them as fresh mmaps in the streamed engine
    (memory.map_large_allocations), instead of every α mapping and unmapping 17 MB buffers for Qwen2.5-0.5B's
    MLP (155M page faults, 14% of a streamed AWQ run's time, session 11)."""
    rows = max(1, slice_ // w.shape[1])
    return sum(output_error(c - fake_rtn(c * s, bits, group_size) / s, H) for c in w.split(rows))


def search_scale(weights: list[Tensor], H: Tensor, mean: Tensor, bits: int, group_size: int | None,
                 grid: int, slice_: int = SLICE, duo: bool = False) -> tuple[Tensor, float, list[float]]:
    """weights: the group's [O, I] float weights; H [I, I] and mean [I] of their common input.
    Returns (s [I], α, err of each candidate): the candidates are s(α) for α = k / grid; with duo, s = 1 (RTN)
    first, then the duo scales mean^α / wmean^(1−α). `slice_`: see scaled_rtn_error."""
    wmean = weight_magnitude(weights, group_size) if duo else None
    cands = ([(0.0, torch.ones_like(mean))] if duo else []) + [(k / grid, scale_for(mean, k / grid, wmean))
                                                                for k in range(grid)]
    errs, best = [], None
    for alpha, s in cands:
        err = sum(scaled_rtn_error(w, s, H, bits, group_size, slice_) for w in weights)
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errs


def clip_qparams(w: Tensor, H: Tensor, bits: int, group_size: int | None) -> QParams:
    """RTN parameters (fp16-rounded, min-max) of w [O, I'] (whole groups), each (row, group) range shrunk by
    the factor f of lowest output error; H [I', I'] the Gram matrix of w's inputs.

    One greedy pass over the groups: group k's candidates are scored by their change of the row's whole
    output error d·H·dᵀ, cross terms with the other groups' current errors included,
    2·d_k·(Σ_{j∉k} H_jk d_j) + d_k·H_kk·d_kᵀ, and every group starts at f = 1, which wins ties."""
    O, I = w.shape
    g = group_size or I
    ng = I // g
    qmax = 2**bits - 1
    wg = w.reshape(O, ng, g)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)  # [O, ng, 1]
    cands = [storage_qparams(compute_qparams(torch.minimum(torch.maximum(wg, lo * f), hi * f).reshape(O, I),
                                             bits, group_size, symmetric=False))
             for f in torch.linspace(1.0, CLIP_MIN, CLIP_GRID).tolist()]
    S = torch.stack([qp.scale for qp in cands])  # [F, O, ng]
    Z = torch.stack([qp.zero for qp in cands])
    scale, zero = S[0].clone(), Z[0].clone()  # [O, ng]
    D = w - dequantize(quantize(w, cands[0]), cands[0])  # [O, I], the current error of every column
    rows = torch.arange(O, device=w.device)
    for k in range(ng):
        sl = slice(k * g, (k + 1) * g)
        Hkk = H[sl, sl]  # [g, g]
        cross = D @ H[:, sl] - D[:, sl] @ Hkk  # [O, g]: Σ over the other groups' columns of d_j·H_jk
        s, z = S[:, :, k, None], Z[:, :, k, None]  # [F, O, 1]
        wk = w[:, sl]  # [O, g]
        dk = wk - (torch.clamp(torch.round(wk / s) + z, 0, qmax) - z) * s  # [F, O, g], as quantize() rounds
        err = 2 * (dk * cross).sum(dim=-1) + ((dk @ Hkk) * dk).sum(dim=-1)  # [F, O]
        best = torch.argmin(err, dim=0)  # [O]: the first minimum, so f = 1 on ties
        scale[:, k], zero[:, k] = S[best, rows, k], Z[best, rows, k]
        D[:, sl] = dk[best, rows]
    return QParams(scale, zero, bits, group_size, symmetric=False)


# ---------------------------------------------------------------------------------- engine functions

def prepare_block(block: torch.nn.Module, spec, stats: dict, config) -> dict:
    """Search (on the float block) and fold the AWQ scales of each smoothing group whose members the step
    selected (stats: {path in the block: stats} of those). Returns stats with H and absum rescaled to the
    layers' new inputs X/s, "alpha" per scaled layer, "clip": False for q and k, and "prepared"."""
    bits, group_size, grid, _clip = check_config(config)
    plans = []
    with torch.no_grad():
        for group in smoothing_groups(block, spec):
            sel = [p for p in group.members if p in stats]
            if not sel:
                continue
            st = stats[sel[0]]  # the members share one input: any member's statistics are the group's
            try:
                H = gram(st)
            except BadInput as e:
                raise BadInput(f"{sel[0]}: {e}") from None
            mean = (st["absum"] / st["n"]).float()
            weights = [linear_weight(group.members[p]) for p in sel]
            s, alpha, _errs = search_scale(weights, H, mean, bits, group_size, grid,
                                           duo=getattr(config, "duo_scaling", False))
            plans.append((group, sel, s, alpha))
        for group, sel, s, alpha in plans:
            if bool((s == 1).all()) or not fold_scales(group, s):
                continue
            s64 = s.double()
            for p in sel:
                stats[p] = {**stats[p], "H": stats[p]["H"] / (s64[:, None] * s64[None, :]),
                            "absum": stats[p]["absum"] / s64, "alpha": alpha}
    for p in stats:  # apply refuses statistics that never went through here (an engine without prepare_block)
        stats[p] = {**stats[p], "prepared": True, **({"clip": False} if p in (spec.q, spec.k, spec.qkv) else {})}
    return stats


def apply(module: torch.nn.Module, stats: dict, config) -> torch.nn.Module:
    """The layer's (already scaled) weight as RTN codes in a PackedLinear, with the output-aware clip search
    when config.clip (and stats allow); config.scale_only: the float module itself."""
    bits, group_size, _grid, clip = check_config(config)
    if not stats.get("prepared"):
        raise BadInput("AWQ's statistics were not prepared: the engine must call awq.prepare_block on each block "
                       "before apply (calibrate.run_sequential does)")
    if getattr(config, "scale_only", False):
        return module
    w = linear_weight(module)  # [O, I]
    in_f = w.shape[1]
    wp = pad_to_groups(w, group_size)  # [O, I'], zero columns up to whole groups
    if clip and stats.get("clip", True):
        H = gram(stats)
        pad = wp.shape[1] - in_f
        qp = clip_qparams(wp, F.pad(H, (0, pad, 0, pad)), bits, group_size)
    else:
        qp = storage_qparams(compute_qparams(wp, bits, group_size, symmetric=False))
    return PackedLinear.from_codes(quantize(wp, qp)[:, :in_f], qp, module.bias)
