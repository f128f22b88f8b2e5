"""HQQ: Half-Quadratic Quantization (H. Badri and A. Shaji, 2023): weights fitted without calibration data.

Scales come from the min-max range; the zero-points start at one of two points (below) and are refined by
alternating two closed-form steps that minimise  ‖W − Q⁻¹(Q(W))‖_p  (p < 1, robust to the few large errors
that outliers cause):
    W_e  = shrink_p(W − (C − z)·s, β)          generalized soft-thresholding of the error
    z    = mean_group(C − (W − W_e) / s)         the zero that best explains W − W_e
with codes C = clamp(round(W/s + z), 0, 2^b − 1) and β growing by κ each iteration (the paper's defaults:
p = 0.7, β = 10, κ = 1.01, 20 iterations). Each group keeps the zero with the lowest value of that objective,
Σ|W − Q⁻¹(Q(W))|^p, among the iterates and the start, so HQQ's objective is never above its start's (from
the "rtn" start: never above min-max RTN's).
Selecting by the objective rather than by the squared error matters: on SmolLM2-135M at 3 bits g64
(WikiText-2, 40 windows of 512, KLD to the base) squared-error selection gave 1.319 — worse than RTN's
1.299 —, the lp objective 1.236 (l1: 1.274).

Two starts for the zero-points, and neither wins on every model. "rtn" starts from RTN's integer zero, which
keeps 0.0 exactly on the grid but shifts it by up to half a step, clipping each group's min or max; "minmax"
from the fractional zero that puts the min and max exactly on the first and last code (the HQQ library's
default, round_zero=False). Session 7 (`benchmarks/hqq_probe.py`, w3 g64, fake-quantized weights, KLD on
WikiText-2 windows 0–19): Qwen2.5-0.5B — an AWQ-processed checkpoint whose AWQ-scaled salient weights are the
groups' extremes — 0.598 from "minmax" against 0.938 from "rtn" (RTN 0.860); SmolLM2-135M 2.114 from "minmax"
against 1.246 from "rtn" (RTN 1.310). Data-free rules tried to pick a start per group or per layer all failed
on one of the two models (session 7-8, benchmarks/quantization.md: per group by Σe² or by the lp objective;
per group by a salient input column; per layer by the weights' kurtosis, "minmax" where it exceeds 6 (8% of
SmolLM2's layers, 62% of Qwen's): SmolLM2 1.318; an integer zero with the scale widened to cover min and max
(start "cover"): SmolLM2 1.618 / 1.597 without / with HQQ's iterations).

So the default start is "auto": quantize with both starts and keep the model whose next-token distribution
is closer to the float model's — KLD over a check text of AUTO_CHECK = 4 rows × 256 tokens (the built-in
corpus, or the first rows of the calibration data when a command passes some; never the evaluation text). The
weights themselves are still fitted without data; the check costs a second HQQ pass and three short forward
passes per row. It picks "rtn" on SmolLM2 at w3 g64 and w4 g128 and "minmax" on Qwen2.5-0.5B (check KLD at
w3 g64: 0.695 vs 0.862), and the packed rows of benchmarks/quantization.md then beat RTN on both models at
both widths. A module without a tokenizer and without data (no check text) gets "rtn".
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


def cover_qparams(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [O, G, 1] per group of wg [O, G, g]: an integer zero (so 0.0 stays exactly on the grid) and
    the smallest scale with which the grid still covers the group's min and max (no clipping): of the two
    integers around the fractional min-max zero, the one that needs the smaller scale."""
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    a = -lo / ((hi - lo) / qmax).clamp_min(1e-12)  # the fractional zero of min-max
    best_s, best_z = None, None
    for zc in (a.floor(), a.ceil()):
        zc = zc.clamp(0, qmax)
        need = torch.maximum(torch.where(zc < qmax, hi / (qmax - zc).clamp_min(1), hi.new_zeros(())),
                             torch.where(zc > 0, -lo / zc.clamp_min(1), lo.new_zeros(())))
        ok = torch.where(zc >= qmax, hi <= 0, True) & torch.where(zc <= 0, lo >= 0, True)
        need = torch.where(ok, need, torch.full_like(need, float("inf")))
        if best_s is None:
            best_s, best_z = need, zc
        else:
            better = need < best_s
            best_s, best_z = torch.where(better, need, best_s), torch.where(better, zc, best_z)
    s = best_s.clamp_min(1e-8)
    s16 = s.half().float()
    s16 = torch.where(s16 < s, (s * (1 + 2 ** -10)).half().float(), s16)  # rounded up: still covers
    return s16, best_z


def hqq_qparams(w: torch.Tensor, bits: int, group_size: int | None, iters: int = 20, lp_norm: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01, start: str = "rtn") -> tuple[torch.Tensor, QParams]:
    """(codes uint8 [O, I], QParams) for w [O, I]: asymmetric, fp16-representable, HQQ-optimised zero-points.
    The zero is fractional, so a code is round(w/s + z), not round(w/s) + z as for an integer zero.
    start: "rtn" (RTN's integer zero: it shifts the grid by up to half a step and may clip the group's min or
    max), "minmax" (the fractional zero that puts the min and max exactly on the first and last code) or
    "cover" (an integer zero and the scale widened so that the grid covers min and max; measured, not a
    default: module docstring). "auto", the choice between rtn and minmax by a check text, is made over the
    whole model (compress._hqq_model)."""
    qp = storage_qparams(compute_qparams(w, bits, group_size, symmetric=False))
    out_f, in_f = w.shape
    n_groups = qp.scale.shape[1]
    wg = w.reshape(out_f, n_groups, in_f // n_groups)  # [O, G, g]
    s, z = qp.scale[..., None], qp.zero[..., None]  # [O, G, 1]
    qmax = 2 ** bits - 1
    if start == "minmax":
        z = (-wg.amin(-1, keepdim=True) / s).half().float()
    elif start == "cover":
        s, z = cover_qparams(wg, qmax)
    elif start != "rtn":
        raise ValueError(f"start must be minmax, cover or rtn, got {start!r}")

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
            QParams(scale=s[..., 0], zero=best_z[..., 0], bits=bits, group_size=qp.group_size))


AUTO_CHECK = (4, 256)  # start "auto" compares the starts on 4 rows × 256 tokens of text (built-in corpus)


def check_kld(model: torch.nn.Module, rows: list[torch.Tensor],
              candidates: dict[str, dict[int, torch.nn.Module]]) -> dict[str, float]:
    """Mean KLD(float model ‖ model with candidate layers) per next-token prediction over `rows` (each [1, T]
    token ids); a candidate is {id(float layer): its replacement} (compress.converted). The model is left as it
    was."""
    from ..compress import substitute
    from ..eval.scoring import logprobs_at

    total = dict.fromkeys(candidates, 0.0)
    n = 0
    with torch.inference_mode():
        for ids in rows:
            pos = torch.arange(ids.shape[1] - 1)[None]
            base = logprobs_at(model, ids, pos)
            for name, new in candidates.items():
                back = substitute(model, new)
                try:
                    lp = logprobs_at(model, ids, pos)
                finally:
                    substitute(model, back)
                total[name] += float((base.exp() * (base - lp)).sum())
            n += pos.numel()
    return {k: v / n for k, v in total.items()}


def quantize_hqq(mod: torch.nn.Module, step) -> PackedLinear:
    w = linear_weight(mod)
    in_f = w.shape[1]
    w = pad_to_groups(w, step.group_size)  # a partial last group is padded with zeros
    codes, qp = hqq_qparams(w, step.bits, step.group_size, step.iters, step.lp_norm, step.beta, step.kappa,
                            step.start)
    return PackedLinear.from_codes(codes[:, :in_f], qp, mod.bias, symmetric=False)
