"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, 2022): quantize a linear layer's weight one input column at a
time, pushing each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss ‖XWᵀ − XŴᵀ‖², so that the layer's *outputs* change little.

Three pure functions for the sequential engine (calibrate.py):

    init_stats(module)          {"H": Σ XᵀX [I, I] float64, "n": rows seen, "X0"/"n0": the rows of each
                                sequence's first position, and their count (hessian's sink_weight)}
    update_stats(stats, x)      x: [..., I], the layer's inputs; adds xᵀx and the row count
    apply(module, stats, cfg)   a PackedLinear with the codes GPTQ chose

apply, step by step (W: [O, I] float32, H = 2/n · Σ XᵀX: [I, I]):

1. dead inputs: a column whose input is always 0 (diag(H) = 0) gets H[j, j] = 1 and W[:, j] = 0;
2. act_order: columns permuted by descending diag(H) (the most active inputs first, while the most columns are
   left to absorb their error). With groups, act_order needs static groups: every group's parameters are
   chosen up front on the un-permuted weight, so groups stay contiguous in the original column order — the
   only layout PackedLinear stores;
3. dampening: damp · mean(diag(H)) added to the diagonal; if H + damp does not factor, damp is raised ×10
   (0 → 0.001) up to 4 times, then a BadInput;
4. U = upper Cholesky factor of H⁻¹ (float64, then float32);
5. the lazy-batch loop over blocks of columns: inside a block, quantize column j, err = (w_j − q_j) / U[j, j],
   update the block's later columns at once (W[:, j+1:] −= err ⊗ U[j, j+1:]); after the block, apply the whole
   block's error to the columns after it with one matmul. The block size is rounded to whole groups, so that a
   group never straddles two blocks and its parameters are chosen on fully error-updated columns;
6. group parameters (non-static): when a group starts, min-max (or symmetric) parameters of the group's
   current columns via compute_qparams, rounded to fp16 (storage_qparams) so that codes are chosen against
   exactly the values dequantization uses. group_size None: one set per row, chosen before the loop.

A partial last group (I not a multiple of group_size) is padded with zero columns, as rtn.py does: the padded
columns have a diagonal H and no coupling to the real ones, so they stay exactly 0 and receive no error;
they only widen the last group's range to include 0, as RTN's padding does. Their Hessian diagonal is the
mean of the real one, which leaves the dampening unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from ..nn.packed import PackedLinear, pad_to_groups
from .primitives import QParams, check_bits, compute_qparams
from .rtn import storage_qparams


def init_stats(module: torch.nn.Module) -> dict:
    w = linear_weight(module)
    I = w.shape[1]
    return {"H": torch.zeros(I, I, dtype=torch.float64, device=w.device), "n": 0, "X0": [], "n0": 0}


def update_stats(stats: dict, x: Tensor) -> dict:
    """x: [..., I] inputs of the layer; H accumulates Σ xᵀx over all rows (float32 product, float64 sum, added
    in place, slice by slice: no whole float64 copy of the product). For a batch of sequences [B, T, I], the
    first position's rows are kept as they are (the attention sink, see hessian: B rows per batch, where a
    second [I, I] matrix would cost 190 MB for Qwen2.5-0.5B's down_proj)."""
    x = x.detach()
    if x.dim() >= 3 and "X0" in stats:
        x0 = x[:, 0].reshape(-1, x.shape[-1]).float()  # [B, I]: each sequence's first position
        stats["X0"].append(x0.clone())
        stats["n0"] += x0.shape[0]
    x = x.reshape(-1, x.shape[-1]).float()  # [N, I]
    add_gram(stats["H"], x)
    stats["n"] += x.shape[0]
    return stats


GRAM_ROWS = 512  # row blocks of add_gram


def add_gram(H: Tensor, x: Tensor, rows: int = GRAM_ROWS) -> None:
    """H [I, I] float64 += xᵀx for x [N, I] float32 (float32 products, summed in float64), in place.

    For I ≥ 4·rows, in blocks of `rows` rows: only the blocks on and right of the diagonal are multiplied and
    the ones below it are their transposes, which halves the arithmetic (Qwen2.5-0.5B's down_proj, I = 4864,
    1,024 tokens at one thread: 1.8× faster, the same values; benchmarks/gram_speed.py), and no whole [I, I]
    float32 product is held (95 MB there; a [rows, I] block is 10 MB, its float64 copy in the add 20 MB).
    Smaller I: one product, added in row slices (no whole float64 copy of it)."""
    n = H.shape[0]
    if n < 4 * rows:
        product = x.t() @ x
        for i in range(0, n, rows):
            H[i:i + rows] += product[i:i + rows]
        return
    for i in range(0, n, rows):
        j = min(i + rows, n)
        block = x[:, i:j].t() @ x[:, i:]  # [j - i, n - i]: rows i..j, columns i..n
        H[i:j, i:] += block
        if j < n:
            H[j:, i:j] += block[:, j - i:].t()


def hessian(stats: dict, sink_weight: float = 1.0, consume: bool = False) -> Tensor:
    """H = 2/n · Σ XᵀX, [I, I] float64, with each sequence's first position counted sink_weight times.
    consume: build H in the memory of stats["H"] and drop it from stats (apply: no second [I, I] copy).

    The first position is the attention sink: most heads put most of their weight on it, so its keys and
    values are read by every later token, while an unweighted H counts it once in T. Measured on SmolLM2-135M
    (w4 g128, self-generated calibration, 8 WikiText-2 windows): GPTQ's v_proj alone in two blocks raised KLD
    to 0.0122 against RTN's 0.0059 with weight 1, 0.0040 with 64; the whole model 0.427 → 0.267 (RTN 0.394,
    HQQ 0.327)."""
    if stats["n"] == 0:
        raise BadInput("GPTQ saw no calibration inputs for this layer")
    if "H" not in stats:
        raise BadInput("these GPTQ statistics were used up by an earlier apply (it builds the Hessian in their "
                       "memory): pass apply a copy to apply twice")
    H, n = (stats.pop("H") if consume else stats["H"].clone()), stats["n"]
    if sink_weight != 1 and stats.get("n0"):
        x0 = torch.cat(stats["X0"]).double()  # [n0, I]
        H.addmm_(x0.t(), x0, alpha=sink_weight - 1)
        n = n + (sink_weight - 1) * stats["n0"]
    H.mul_(2.0 / n)
    if not torch.isfinite(H).all():
        raise BadInput("GPTQ: the layer's calibration inputs contain inf or NaN")
    return H


def _inverse_cholesky(H: Tensor, damp: float, tries: int = 4) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H); damp ×10 on failure. float64 in, out.

    One [I, I] matrix beside H: the damped copy is factored, inverted and factored again in its own memory
    (LAPACK works in place; H stays intact for a retry). For Qwen2.5-0.5B's down_proj each copy is 190 MB."""
    mean_diag = torch.diagonal(H).mean()
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(tries + 1):
        if attempt:
            damp = damp * 10 if damp > 0 else 1e-3
        A = H.clone()
        A.diagonal().add_(damp * mean_diag)  # = H + λI, bit for bit
        torch.linalg.cholesky_ex(A, out=(A, info))  # A = L
        if info == 0:
            torch.cholesky_inverse(A, out=A)  # A = (H + λI)⁻¹
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # A = U
            if info == 0:
                return A, damp
        del A
    raise BadInput(f"GPTQ: the Hessian does not factor even with damp={damp:g}; give more (or more varied) "
                   f"calibration data, or a larger damp")


def _group_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row parameters of the columns w: [O, g] → scale, zero: [O] (fp16-representable)."""
    qp = storage_qparams(compute_qparams(w, bits, None, symmetric=symmetric))
    return qp.scale[:, 0], qp.zero[:, 0]


def gptq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  block_size: int = 128, keep_zeros: bool = False,
                  grid: QParams | None = None, overwrite_h: bool = False) -> tuple[Tensor, QParams]:
    """W: [O, I] float, H: [I, I] (2/n · Σ XᵀX) → codes [O, I] uint8 and QParams (scale, zero: [O, n_groups],
    group_size as given; I must be a multiple of group_size: pad first). keep_zeros: weights that are exactly 0
    (a pruned layer's mask) get the code of 0 and stay 0, their error compensated like any other, so a
    sparsity pattern survives quantization ([SparseGPT("2:4"), GPTQ(4, 128)]). grid: every group's scale and
    zero given up front (asymmetric; the zero may be fractional, as HQQ's: code = round(w/s + z)); GPTQ then
    only chooses the codes. A fractional zero cannot hold a weight at exactly 0, so grid excludes keep_zeros.
    overwrite_h: H (float64) may be changed in place — apply's own Hessian, so no second [I, I] copy is made."""
    bits = check_bits(bits)
    O, I = W.shape
    g = group_size or I
    if I % g:
        raise BadInput(f"gptq_quantize: group_size={group_size} must divide in_features={I} (pad first)")
    if act_order and group_size is not None and not static_groups:
        raise BadInput("GPTQ act_order with groups needs static_groups=True: groups must stay contiguous in the "
                       "original column order to be stored packed")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        raise BadInput(f"GPTQ damp must be a number >= 0, got {damp!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise BadInput(f"GPTQ block_size must be a positive integer, got {block_size!r}")
    if grid is not None and (symmetric or tuple(grid.scale.shape) != (O, I // g)):
        raise BadInput(f"gptq_quantize: grid must be asymmetric with scale/zero of shape {(O, I // g)}")
    W = W.detach().float().clone()
    if not torch.isfinite(W).all():
        raise BadInput("GPTQ: the weight contains inf or NaN")
    H = H.detach().to(torch.float64, copy=not overwrite_h)
    qlo, qhi = (1 if symmetric else 0), 2**bits - 1
    n_groups = I // g

    # 1. dead inputs
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    mask = (W == 0) if keep_zeros and grid is None else None  # [O, I]: weights held at exactly 0

    # parameters chosen up front: per channel, or static groups (on the un-permuted, un-updated weight)
    scale = torch.zeros(O, n_groups, device=W.device)  # [O, n_groups]
    zero = torch.zeros(O, n_groups, device=W.device)
    upfront = group_size is None or static_groups or grid is not None
    if grid is not None:
        scale, zero = grid.scale.float().clone(), grid.zero.float().clone()
    elif upfront:
        for k in range(n_groups):
            scale[:, k], zero[:, k] = _group_params(W[:, k * g:(k + 1) * g], bits, symmetric)

    # 2. act order: perm[j] = original column quantized j-th
    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(I, device=W.device))
    W = W[:, perm]
    if act_order:  # rows, then columns into H's own memory: one [I, I] copy at a time
        torch.index_select(H[perm], 1, perm, out=H)
    mask = mask[:, perm] if mask is not None else None

    # 3-4. dampening and the upper Cholesky factor of H⁻¹
    U = _inverse_cholesky(H, damp)[0].float()  # [I, I]
    del H

    # 5. the lazy-batch loop; blocks are whole groups when grouping is dynamic
    B = block_size if upfront else max(1, block_size // g) * g
    codes = torch.zeros(O, I, dtype=torch.uint8, device=W.device)
    group_of = (perm // g).tolist()  # [I]: group (original order) of each permuted column
    for i1 in range(0, I, B):
        i2 = min(i1 + B, I)
        W1 = W[:, i1:i2].clone()  # [O, b], the block's columns, updated as we go
        E1 = torch.zeros_like(W1)  # [O, b], scaled errors of the block's columns
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if not upfront and j % g == 0:  # 6. a new group: parameters of its current columns
                cols = W1[:, i:i + g]  # with its held zeros at 0, so that 0 is in each such row's range
                cols = cols.masked_fill(mask[:, j:j + g], 0) if mask is not None else cols
                scale[:, j // g], zero[:, j // g] = _group_params(cols, bits, symmetric)
            k = group_of[j]
            s, z = scale[:, k], zero[:, k]  # [O]
            w = W1[:, i]  # [O]
            if grid is None:
                q = torch.clamp(torch.round(w / s) + z, qlo, qhi)  # codes, the formula of primitives.quantize
            else:
                q = torch.clamp(torch.round(w / s + z), qlo, qhi)  # a fractional zero's codes (quant/hqq.py)
            if mask is not None:
                q = torch.where(mask[:, j], z, q)  # z is an integer code in range: (z − z)·s = 0 exactly
            codes[:, j] = q.to(torch.uint8)
            err = (w - (q - z) * s) / U1[i, i]  # [O]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # column i itself becomes its dequantized value
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the block's error onto every later column at once

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return codes, QParams(scale, zero, bits, group_size, symmetric)


def apply(module: torch.nn.Module, stats: dict, config) -> PackedLinear:
    """A PackedLinear with `module`'s weight quantized by GPTQ with config.bits, .group_size, .symmetric, .damp,
    .act_order, .static_groups, .block_size and .sink_weight (missing fields take the defaults of gptq_quantize)."""
    bits = check_bits(config.bits)
    group_size = getattr(config, "group_size", None)
    symmetric = getattr(config, "symmetric", False)
    W = linear_weight(module)  # [O, I]
    in_f = W.shape[1]
    H = hessian(stats, getattr(config, "sink_weight", 1.0), consume=True)  # [I, I], in stats' memory
    W = pad_to_groups(W, group_size)  # [O, I'], zero columns up to whole groups
    if W.shape[1] > in_f:  # padded inputs: a diagonal Hessian (no coupling to the real ones) at the mean of the
        pad = W.shape[1] - in_f  # real diagonal, so that the dampening (∝ mean diag) does not change
        d = float(torch.diagonal(H).mean()) or 1.0
        H = torch.block_diag(H, d * torch.eye(pad, dtype=H.dtype, device=H.device))
    grid = None
    if getattr(config, "grid", "minmax") == "hqq":  # HQQ's scales and zeros on the original weight (hqq.py)
        if float((W[:, :in_f] == 0).float().mean()) > 0.1:
            raise BadInput("GPTQ grid='hqq' cannot keep a pruned layer's zeros at exactly 0 (its zero-points are "
                           "fractional): use grid='minmax' after pruning")
        from .hqq import hqq_qparams

        grid = hqq_qparams(W, bits, group_size)[1]
    codes, qp = gptq_quantize(W, H, bits, group_size, symmetric, damp=getattr(config, "damp", 0.01),
                              act_order=getattr(config, "act_order", False),
                              static_groups=getattr(config, "static_groups", False),
                              block_size=getattr(config, "block_size", 128),
                              keep_zeros=getattr(config, "keep_zeros", True), grid=grid, overwrite_h=True)
    return PackedLinear.from_codes(codes[:, :in_f], qp, module.bias, symmetric=symmetric)
