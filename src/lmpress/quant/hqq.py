"""HQQ: Half-Quadratic Quantization (H. Badri and A. Shaji, 2023), calibration-free.

Scales come from the min-max range; the zero-points start at RTN's integer zero and are refined by
alternating two closed-form steps that minimise  ‖W − Q⁻¹(Q(W))‖_p  (p < 1, robust to the few large errors
that outliers cause):
    W_e  = shrink_p(W − (C − z)·s, β)          generalized soft-thresholding of the error
    z    = mean_group(C − (W − W_e) / s)         the zero that best explains W − W_e
with codes C = clamp(round(W/s + z), 0, 2^b − 1) and β growing by κ each iteration (the paper's defaults:
p = 0.7, β = 10, κ = 1.01, 20 iterations). Each group keeps the zero with the lowest value of that objective,
Σ|W − Q⁻¹(Q(W))|^p, among the iterates and the start, so HQQ's objective is never above min-max RTN's.
Selecting by the objective rather than by the squared error matters: on SmolLM2-135M at 3 bits g64
(WikiText-2, 40 windows of 512, KLD to the base) squared-error selection gave 1.319 — worse than RTN's
1.299 —, the lp objective 1.236 (l1: 1.274).

start="minmax" starts instead from the fractional zero that puts each group's min and max exactly on the first
and last code (the HQQ library's default, round_zero=False). Which start is better depends on the model
(session 7, `benchmarks/hqq_probe.py`, w3 g64, KLD on WikiText-2 windows 0–19): on Qwen2.5-0.5B, whose
AWQ-scaled salient weights are the groups' extremes that RTN's integer zero clips, 0.598 from "minmax" against
0.938 from "rtn" (RTN 0.860; plain min-max with the exact fractional zero 0.672); on SmolLM2-135M 2.114 from
"minmax" against 1.246 from "rtn" (RTN 1.310). Per group the better of both (by Σe² / by the lp objective):
Qwen 0.729, SmolLM2 1.762 / 1.798. The minmax start only in groups holding an input column whose norm is over
1.5× the layer's median (36% of Qwen's g64 groups, 2% of SmolLM2's; packed rows, table windows): SmolLM2 w3 g64
1.219 and w4 g128 0.327 (both below RTN), but Qwen w3 g64 1.099 — worse than either pure start, so it was not
kept (commit 7d6d042, reverted). No calibration-free rule found yet wins on both; "rtn" stays the default.
"""

from __future__ import annotations

import torch

from ..nn import linear_weight
from ..nn.packed import PackedLinear, pad_to_groups
from .primitives import QParams, compute_qparams
from .rtn import storage_qparams


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """argmin_y  |y|^p + β/2 (y − x)²  approximately: sign(x) · relu(|x| − |x|^(p−1) / β)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_qparams(w: torch.Tensor, bits: int, group_size: int | None, iters: int = 20, lp_norm: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01, start: str = "rtn") -> tuple[torch.Tensor, QParams]:
    """(codes uint8 [O, I], QParams) for w [O, I]: asymmetric, fp16-representable, HQQ-optimised zero-points.
    The zero is fractional, so a code is round(w/s + z), not round(w/s) + z as for an integer zero.
    start: "rtn" (RTN's integer zero: it shifts the grid by up to half a step and may clip the group's min or
    max) or "minmax" (the fractional zero that puts the min and max exactly on the first and last code; see the
    module docstring for when each wins)."""
    qp = storage_qparams(compute_qparams(w, bits, group_size, symmetric=False))
    out_f, in_f = w.shape
    n_groups = qp.scale.shape[1]
    wg = w.reshape(out_f, n_groups, in_f // n_groups)  # [O, G, g]
    s, z = qp.scale[..., None], qp.zero[..., None]  # [O, G, 1]
    if start == "minmax":
        z = (-wg.amin(-1, keepdim=True) / s).half().float()
    elif start != "rtn":
        raise ValueError(f"start must be minmax or rtn, got {start!r}")
    qmax = 2 ** bits - 1

    def error(zero):  # the lp objective per group
        codes = torch.clamp(torch.round(wg / s + zero), 0, qmax)
        return codes, ((codes - zero) * s - wg).abs().pow(lp_norm).sum(-1, keepdim=True)

    codes, best_err = error(z)
    best_z = z
    for _ in range(iters):
        w_e = _shrink(wg - (codes - z) * s, beta, lp_norm)
        z = (codes - (wg - w_e) / s).mean(-1, keepdim=True).half().float()  # stored as fp16
        codes, err = error(z)
        better = err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
        beta *= kappa
    codes, _ = error(best_z)
    return (codes.reshape(out_f, in_f).to(torch.uint8),
            QParams(scale=qp.scale, zero=best_z[..., 0], bits=bits, group_size=qp.group_size))


def quantize_hqq(mod: torch.nn.Module, step) -> PackedLinear:
    w = linear_weight(mod)
    in_f = w.shape[1]
    w = pad_to_groups(w, step.group_size)  # a partial last group is padded with zeros
    codes, qp = hqq_qparams(w, step.bits, step.group_size, step.iters, step.lp_norm, step.beta, step.kappa,
                            step.start)
    return PackedLinear.from_codes(codes[:, :in_f], qp, mod.bias, symmetric=False)
