"""Plain-torch twins of the native kernels (lmpress.kernels), for tests and for reading what they compute.

Each takes the same arguments as its kernel and computes in float64 from the same inputs, so a kernel differs from
its twin only by float32 rounding and summation order (the tests state the tolerances). Slow.
"""

from __future__ import annotations

import torch

from ..quant.primitives import unpack
from . import BLOCK


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int | None, in_features: int) -> torch.Tensor:
    """PackedLinear storage → float64 weight [O, I]: (code − zero)·scale, group of column i = i // group_size."""
    codes = unpack(qweight, bits, in_features).double()                 # [O, I]
    group = torch.arange(in_features) // (group_size or in_features)     # [I] → group index
    return (codes - zeros.double().t()[:, group]) * scales.double().t()[:, group]


def quantize_q8(x: torch.Tensor) -> torch.Tensor:
    """x [M, I] float32 → the float64 values the "q8" kernels multiply: per block of 32 columns, d = max|x|/127
    and q = round(x·(127/max|x|)) in float32, ties to even; returns q·d."""
    M, I = x.shape
    pad = -I % BLOCK
    xb = torch.nn.functional.pad(x.float(), (0, pad)).reshape(M, -1, BLOCK)  # [M, nblk, 32]
    amax = xb.abs().amax(dim=-1, keepdim=True)
    d = amax / 127.0
    # a true float32 division, as the kernels (`127.0 / amax` is reciprocal-then-multiply in torch: one ulp off at
    # times, which moves a rounding tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q.double() * d.double()).reshape(M, -1)[:, :I]


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    x2 = x.reshape(-1, w.shape[1])
    xx = quantize_q8(x2) if act == "q8" else x2.double()
    y = xx @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], w.shape[0])


def linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int | None, bias: torch.Tensor | None = None, act: str = "f32") -> torch.Tensor:
    """Twin of kernels.linear_packed."""
    return _linear(x, dequantize_packed(qweight, scales, zeros, bits, group_size, x.shape[-1]), bias, act)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                act: str = "f32") -> torch.Tensor:
    """Twin of kernels.linear_int8."""
    return _linear(x, qweight.double() * scales.double()[:, None], bias, act)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                mode: str = "dynamic", in_scale: float = 0.0, in_zero: int = 0) -> torch.Tensor:
    """Twin of kernels.linear_w8a8: the w8a8 formats' own emulations of fbgemm (nn/int8_dynamic.py,
    nn/int8_static.py), which define those formats' numbers. Imported here, lazily, for tests only."""
    from ..nn.int8_dynamic import _TINY, emulate_kernel
    from ..nn.int8_static import emulate_static_kernel

    x2 = x.reshape(-1, qweight.shape[1]).float()
    if mode == "static":
        y = emulate_static_kernel(x2, in_scale, in_zero, qweight, scales, bias)
    elif mode == "dynamic":
        y = emulate_kernel(x2, qweight, scales, bias)
    else:
        r = x2.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY)
        y = emulate_kernel(x2 / r, qweight, scales, bias)
        y = y.mul_(r) if bias is None else y.sub_(bias.float()).mul_(r).add_(bias.float())
    return y.reshape(*x.shape[:-1], qweight.shape[0])
