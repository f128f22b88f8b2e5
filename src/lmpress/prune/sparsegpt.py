"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer one input column at a time and push each pruned
weight's error onto the columns not yet visited, through the inverse Hessian of the layer's reconstruction
loss ‖XWᵀ − XŴᵀ‖² — the Optimal Brain Surgeon update, made cheap by GPTQ's column order. The kept weights
move to compensate; optionally they are quantized in the same pass (GPTQ's grid), so pruning and
quantization errors are compensated together.

Three pure functions for the sequential engine (calibrate.py); the statistics are GPTQ's own:

    init_stats(module)          {"H": Σ XᵀX [I, I] float64, "n": rows seen, …}   (quant/gptq.py; the
                                first-position sink weighting is GPTQ's only: hessian(stats) here)
    update_stats(stats, x)      x: [..., I]                                       (quant/gptq.py)
    apply(module, stats, cfg)   bits None: the same module, weights pruned and updated in place;
                                bits set: a PackedLinear whose pruned weights are the zero code (exactly 0)

sparsegpt_prune, step by step (W: [O, I] float32, H = 2/n · Σ XᵀX):

1. dead inputs (diag H = 0): H[j, j] = 1 and W[:, j] = 0, as in GPTQ; their scores are then 0, so they are
   the first pruned;
2. dampening and U = upper Cholesky factor of (H + λI)⁻¹ (gptq._inverse_cholesky: λ raised on failure);
3. the lazy-batch loop over blocks of B columns (B a multiple of M for N:M, and of the group size when
   quantizing with groups, so that neither an N:M group nor a quantization group straddles two blocks):
   - mask selection, adaptive: the OBS saliency of weight (r, j) is w_rj² / U[j, j]² (U[j, j]² is [H⁻¹]_jj
     once the earlier columns are eliminated), on the block's *current* (error-updated) weights.
     Unstructured: the k lowest saliencies of the whole [O, B] block are pruned, so rows and columns get
     different sparsities (the paper's adaptive selection); k is allotted so that the layer prunes exactly
     floor(sparsity · O · I) weights: k = floor(s · O · i2) − floor(s · O · i1) for block [i1, i2).
     N:M: when a group of M columns starts, the M − N lowest saliencies of each row within it are pruned;
   - column j: q = 0 where pruned, else w (or its quantized value); err = (w − q) / U[j, j];
     the block's later columns −= err ⊗ U[j, j+1:]; after the block, the later columns −= E · U[block, later].
4. joint quantization (bits set): group parameters (min-max or symmetric, fp16-rounded, as GPTQ) chosen when
   a group starts, on its current columns with the already-known pruned weights set to 0, and with 0 always
   inside the range. That last point is what makes pruned weights exactly 0: with w ≈ (code − zero) · scale,
   0 is on the grid iff the zero-point is an integer code in [0, 2^b − 1], which min-max parameters give iff
   min ≤ 0 ≤ max (an all-positive group would have a negative zero-point, and 0 would decode to a non-zero
   value). Pruned weights get the code `zero`. Kept weights may still round to the zero code, which is
   ordinary quantization: a group then has fewer than N non-zeros, never more. group_size None: one set of
   parameters per row, chosen before the loop. A partial last group needs no padding: including 0 in the
   range is exactly what padding with zero columns did in rtn.py and gptq.py, and PackedLinear decodes it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from ..nn.packed import PackedLinear
from ..quant.gptq import _inverse_cholesky, hessian, init_stats, update_stats  # noqa: F401 (the stats are GPTQ's)
from ..quant.primitives import QParams, check_bits, compute_qparams
from ..quant.rtn import storage_qparams
from .masks import check_sparsity, global_mask, n_pruned, nm_mask, parse_pattern, write_weight


class Pruned(NamedTuple):
    weight: Tensor  # [O, I] float32: the pruned (and, with bits, dequantized) weight
    mask: Tensor  # [O, I] bool, True = kept
    codes: Tensor | None  # [O, I] uint8 when quantized
    qparams: QParams | None  # scale, zero: [O, ceil(I / group_size)] when quantized


def _params_with_zero(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row parameters of the columns w [O, c] with 0 inside every row's range → scale, zero: [O]
    (fp16-representable; zero is an integer code in [0, 2^bits − 1], so 0 dequantizes exactly)."""
    w0 = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)  # a zero column: min <= 0 <= max
    qp = storage_qparams(compute_qparams(w0, bits, None, symmetric=symmetric))
    return qp.scale[:, 0], qp.zero[:, 0]


def _renamed(e: BadInput) -> BadInput:
    return BadInput(str(e).replace("GPTQ", "SparseGPT"))


def sparsegpt_prune(W: Tensor, H: Tensor, sparsity: float = 0.5, pattern: str | None = None,
                    bits: int | None = None, group_size: int | None = None, symmetric: bool = False,
                    damp: float = 0.01, block_size: int = 128, mask: Tensor | None = None,
                    overwrite_h: bool = False) -> Pruned:
    """W: [O, I] float, H: [I, I] (2/n · Σ XᵀX) → Pruned (see the module docstring for the algorithm).

    mask: a fixed keep-mask [O, I] instead of choosing one (sparsity and pattern are then ignored): the
    weights outside it are pruned and the rest compensated (and quantized, with bits) — e.g. to quantize an
    already pruned weight without losing its zeros: mask = W != 0. overwrite_h: H (float64) may be changed in
    place (apply's own Hessian: no second [I, I] copy)."""
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if mask is not None:
        if mask.shape != W.shape or mask.dtype != torch.bool:
            raise BadInput(f"SparseGPT: a fixed mask must be bool {tuple(W.shape)}, got {mask.dtype} "
                           f"{tuple(mask.shape)}")
        sparsity, nm = 0.0, None
    if bits is not None:
        bits = check_bits(bits)
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise BadInput(f"SparseGPT group_size must be a positive integer or None, got {group_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        raise BadInput(f"SparseGPT damp must be a number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise BadInput(f"SparseGPT block_size must be a positive integer, got {block_size!r}")
    W = W.detach().float().clone()
    O, I = W.shape
    if H.shape != (I, I):
        raise BadInput(f"SparseGPT: Hessian {tuple(H.shape)} does not match a weight with {I} inputs")
    if not torch.isfinite(W).all():
        raise BadInput("SparseGPT: the weight contains inf or NaN")
    H = H.detach().to(torch.float64, copy=not overwrite_h)

    # 1. dead inputs
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    # 2. U: upper Cholesky factor of (H + λI)⁻¹
    try:
        U = _inverse_cholesky(H, damp)[0].float()  # [I, I]
    except BadInput as e:
        raise _renamed(e) from None
    del H
    d2 = torch.diagonal(U).pow(2)  # [I], the saliency denominators

    # quantization state
    g = (group_size or I) if bits else I
    qlo, qhi = (1 if symmetric else 0), (2**bits - 1 if bits else 0)
    n_groups = -(-I // g)
    scale = torch.zeros(O, n_groups, device=W.device)  # [O, n_groups]
    zero = torch.zeros(O, n_groups, device=W.device)
    codes = torch.zeros(O, I, dtype=torch.uint8, device=W.device) if bits else None
    if bits and group_size is None:
        scale[:, 0], zero[:, 0] = _params_with_zero(W, bits, symmetric)

    # 3. the lazy-batch loop
    unit = math.lcm(nm[1] if nm else 1, g if bits and group_size else 1)
    B = max(1, block_size // unit) * unit
    out = torch.zeros_like(W)  # [O, I], the final weights
    keep = torch.ones(O, I, dtype=torch.bool, device=W.device) if mask is None else mask.clone()
    for i1 in range(0, I, B):
        i2 = min(i1 + B, I)
        W1 = W[:, i1:i2].clone()  # [O, b], updated as we go
        E1 = torch.zeros_like(W1)  # [O, b], scaled errors
        U1 = U[i1:i2, i1:i2]  # [b, b]
        K1 = keep[:, i1:i2]  # [O, b], a view: masks written here land in `keep`
        if nm is None and sparsity > 0:
            k = n_pruned(sparsity, O * i2) - n_pruned(sparsity, O * i1)
            K1.copy_(global_mask(W1.pow(2) / d2[None, i1:i2], k=k))
        for i in range(i2 - i1):
            j = i1 + i
            if nm and j % nm[1] == 0:  # a new N:M group (B is a multiple of M: i and j agree mod M)
                c = slice(i, min(i + nm[1], i2 - i1))
                K1[:, c] = nm_mask(W1[:, c].pow(2) / d2[None, j:j + c.stop - c.start], *nm)
            w = W1[:, i]  # [O]
            kept = K1[:, i]  # [O]
            if bits:
                if group_size and j % g == 0:  # 4. a new group: parameters of its current, masked columns
                    c = slice(i, min(i + g, i2 - i1))
                    scale[:, j // g], zero[:, j // g] = _params_with_zero(W1[:, c] * K1[:, c], bits, symmetric)
                s, z = scale[:, j // g], zero[:, j // g]
                qc = torch.where(kept, torch.clamp(torch.round(w / s) + z, qlo, qhi), z)  # pruned: code `zero`
                codes[:, j] = qc.to(torch.uint8)
                q = (qc - z) * s  # exactly 0 where pruned
            else:
                q = torch.where(kept, w, torch.zeros_like(w))
            out[:, j] = q
            err = (w - q) / U1[i, i]  # [O]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the block's error onto every later column at once

    qp = QParams(scale, zero, bits, group_size, symmetric) if bits else None
    return Pruned(out, keep, codes, qp)


def apply(module: torch.nn.Module, stats: dict, config) -> torch.nn.Module:
    """config.sparsity, .pattern, .bits (None: prune only, in place), .group_size, .symmetric, .damp,
    .block_size (missing fields take sparsegpt_prune's defaults; group_size's default is 128)."""
    bits = getattr(config, "bits", None)
    group_size = getattr(config, "group_size", 128)
    symmetric = getattr(config, "symmetric", False)
    try:
        H = hessian(stats, consume=True)  # in stats' memory, changed in place below: one [I, I] copy less
    except BadInput as e:
        raise _renamed(e) from None
    r = sparsegpt_prune(linear_weight(module), H, getattr(config, "sparsity", 0.5), getattr(config, "pattern", None),
                        bits, group_size, symmetric, getattr(config, "damp", 0.01), getattr(config, "block_size", 128),
                        overwrite_h=True)
    if bits is None:
        return write_weight(module, r.weight)
    return PackedLinear.from_codes(r.codes, r.qparams, module.bias, symmetric=symmetric)
