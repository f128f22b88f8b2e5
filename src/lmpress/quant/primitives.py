"""Affine quantization primitives: parameters, rounding, error metrics and bit packing.

Pure tensor math: no modules, no model knowledge. Every quantizer in lmpress builds on these.

Conventions
-----------
Weights are ``w: [O, I]`` (output rows, input columns). Groups run along the input dimension:

- ``group_size=g``: each row splits into ``I // g`` groups of ``g`` consecutive columns (g must divide I);
- ``group_size=None``: per output channel, one group per row;
- ``per_tensor=True``: one scale for the whole tensor, returned broadcast to ``[O, 1]`` (and recorded as
  ``group_size=None``), so parameters are always ``scale, zero: [O, n_groups]`` float32.

Stored codes are unsigned integers in ``[0, 2^b - 1]`` (uint8) for ``b`` in 2..8, and dequantization is
always ``w ≈ (code - zero) · scale``. Callers store ``scale`` and ``zero`` as fp16.

- **symmetric** ("uniform"): ``scale = max|w| / (2^(b-1) - 1)``, ``zero = 2^(b-1)`` (a constant),
  ``code = clamp(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1) + 2^(b-1)``, so codes lie in
  ``[1, 2^b - 1]`` and code 0 is unused: the grid is symmetric around 0 and 0 is exact. The often-quoted
  int8 recipe ``round(W · 255 / max(W))`` produces values up to 255, which overflow a signed byte (its
  maximum is 127) and wrap around to negative numbers; here the signed view ``code - 128`` of an int8 code
  is always in -127..127.
- **asymmetric** ("min-max"): ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``,
  ``code = clamp(round(w / scale) + zero, 0, 2^b - 1)``. The zero-point is an integer value but is *not*
  clamped to the code range: an all-positive group has a negative zero-point (e.g. a group in [1, 4] at
  2 bits has zero = -1), an all-negative one a zero-point above ``2^b - 1``.
- Degenerate groups: an all-zero group gets a tiny positive scale (``2^-14``, the smallest normal fp16, so
  it survives the caller's fp16 cast) and dequantizes to exactly 0, never NaN. A constant non-zero group
  in min-max mode gets ``scale = |c| / (2^b - 1)`` so that it dequantizes to ``c``.
- Rounding is round-to-nearest, ties to even (``torch.round``): 0.5 -> 0, 1.5 -> 2, -0.5 -> 0.
- Clipping (``clip=True``): for each group, try shrinking the range by factors in
  ``linspace(1, clip_min, clip_grid)`` (symmetric: ``max|w| · f``; min-max: ``min · f`` and ``max · f``) and
  keep the factor with the lowest squared error of that group. Factor 1 is always tried first and kept on
  ties, so clipping never increases the error.

Packed layouts (read by native kernels; rows are contiguous and independent)
----------------------------------------------------------------------------
Every width is the same little-endian bitstream per row: the code of column ``c`` occupies bits
``c·b .. c·b + b - 1`` of the row, where bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``.
Each row starts on a byte boundary and unused trailing bits are zero. Spelled out per width:

- 8 bits: one code per byte; row bytes = ``I``.
- 4 bits: two per byte, column ``2j`` in the low nibble and ``2j + 1`` in the high nibble of byte ``j``;
  row bytes = ``ceil(I / 2)``.
- 2 bits: four per byte, column ``4j + k`` at bits ``2k .. 2k + 1`` of byte ``j``; row bytes = ``ceil(I / 4)``.
- 3 bits: every 8 columns fill 3 bytes: column ``8j + k`` occupies bits ``3k .. 3k + 2`` of the 24-bit
  little-endian word made of bytes ``3j, 3j + 1, 3j + 2``; row bytes = ``3 · ceil(I / 8)`` (whole 3-byte
  words, so a kernel can always load a full word).
- 5, 6, 7 bits: the generic bitstream; row bytes = ``ceil(I · b / 8)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from ..errors import BadInput

MIN_BITS, MAX_BITS = 2, 8
TINY_SCALE = 2.0**-14  # smallest normal fp16: positive after the caller's fp16 cast


@dataclass(frozen=True, eq=False)
class QParams:
    """Affine parameters of one weight: ``w ≈ (code - zero) · scale``.

    scale, zero: [O, n_groups] float32. group_size None = per channel (or per tensor, where every scale is
    the same). symmetric=True marks the symmetric grid (zero = 2^(b-1), codes restricted to [1, 2^b - 1]);
    the default False allows the full code range [0, 2^b - 1], right for any affine parameters built
    elsewhere (e.g. by HQQ).
    """

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int | None
    symmetric: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.scale.dim() != 2 or self.scale.shape != self.zero.shape:
            raise BadInput(f"scale and zero must both be [O, n_groups]; got {tuple(self.scale.shape)} "
                           f"and {tuple(self.zero.shape)}")

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def code_range(self) -> tuple[int, int]:
        """The (lowest, highest) code quantize may produce."""
        hi = 2**self.bits - 1
        return (1 if self.symmetric else 0), hi


# ---------------------------------------------------------------------------------------------- checks

def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise BadInput(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {bits!r}")
    return int(bits)


def check_group(in_features: int, group_size: int | None) -> int:
    """Return the group length along the input dimension (in_features when group_size is None)."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size < 1:
        raise BadInput(f"group_size must be a positive integer or None (per output channel); got {group_size!r}")
    if in_features % group_size:
        below = max(d for d in range(1, min(group_size, in_features) + 1) if in_features % d == 0)
        raise BadInput(f"group_size={group_size} does not divide the input dimension (in_features={in_features}); "
                       f"use a divisor of {in_features} such as {below}, or group_size=None (per output channel)")
    return int(group_size)


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise BadInput(f"expected a weight of shape [out_features, in_features]; got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise BadInput(f"expected a float weight; got {w.dtype}")


def _groups(w: Tensor, n_groups: int) -> Tensor:
    """[O, I] -> [O, n_groups, g] (a view when w is contiguous)."""
    O, I = w.shape
    if I % n_groups:
        raise BadInput(f"{n_groups} groups do not divide in_features={I}")
    return w.reshape(O, n_groups, I // n_groups)


# ---------------------------------------------------------------------------------------------- params

def _params_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero from a range. symmetric: hi is max|w| (lo unused). Shapes follow lo/hi."""
    if symmetric:
        scale = hi / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, TINY_SCALE))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    # constant group c: scale |c|/qmax puts c on the grid; all-zero group: tiny scale, zero 0, exact 0
    flat = torch.where(hi.abs() > 0, hi.abs() / qmax, torch.full_like(hi, TINY_SCALE))
    scale = torch.where(scale > 0, scale, flat)
    return scale, torch.round(-lo / scale) + 0.0  # + 0.0 turns -0.0 into 0.0


def _fake(wg: Tensor, scale: Tensor, zero: Tensor, qlo: int, qhi: int) -> Tensor:
    """wg: [..., g], scale/zero: [..., 1] -> dequantized codes, float32."""
    codes = torch.clamp(torch.round(wg / scale) + zero, qlo, qhi)
    return (codes - zero) * scale


def compute_qparams(w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                    per_tensor: bool = False, clip: bool = False, clip_grid: int = 20,
                    clip_min: float = 0.5) -> QParams:
    """Round-to-nearest affine parameters for w: [O, I], optionally with an MSE-optimal range shrink."""
    _check_weight(w)
    bits = check_bits(bits)
    O, I = w.shape
    if per_tensor and group_size is not None:
        raise BadInput("per_tensor=True uses one scale for the whole tensor; leave group_size=None")
    g = check_group(I, group_size)
    if clip and (clip_grid < 1 or not 0 < clip_min <= 1):
        raise BadInput(f"clip needs clip_grid >= 1 and 0 < clip_min <= 1; got {clip_grid}, {clip_min}")

    w = w.detach().float()
    wg = w.reshape(1, 1, O * I) if per_tensor else w.reshape(O, I // g, g)  # [rows, n_groups, g]
    if symmetric:
        hi = wg.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    else:
        lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    scale, zero = _params_from_range(lo, hi, bits, symmetric)

    if clip:
        qlo, qhi = (1 if symmetric else 0), 2**bits - 1
        best_err = torch.full_like(scale, math.inf)
        for f in torch.linspace(1.0, clip_min, clip_grid).tolist():  # a loop over factors, not groups
            s, z = _params_from_range(lo * f, hi * f, bits, symmetric)
            err = (_fake(wg, s, z, qlo, qhi) - wg).pow(2).sum(dim=-1, keepdim=True)
            better = err < best_err  # strict: factor 1 (tried first) wins ties
            best_err = torch.where(better, err, best_err)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)

    scale, zero = scale.squeeze(-1), zero.squeeze(-1)  # [rows, n_groups]
    if per_tensor:
        scale, zero = scale.expand(O, 1).clone(), zero.expand(O, 1).clone()
    return QParams(scale.contiguous(), zero.contiguous(), bits, None if per_tensor else group_size, symmetric)


# ---------------------------------------------------------------------------------- quantize/dequantize

def _check_params(shape: torch.Size, qp: QParams) -> None:
    O, I = shape
    if qp.scale.shape[0] != O or I % qp.n_groups:
        raise BadInput(f"parameters {tuple(qp.scale.shape)} do not fit a weight of shape {tuple(shape)}")
    if qp.group_size is not None and qp.group_size * qp.n_groups != I:
        raise BadInput(f"group_size={qp.group_size} with {qp.n_groups} groups does not match in_features={I}")


def quantize(w: Tensor, qp: QParams) -> Tensor:
    """w: [O, I] float -> codes: [O, I] uint8 in qp.code_range()."""
    _check_weight(w)
    _check_params(w.shape, qp)
    qlo, qhi = qp.code_range()
    scale, zero = qp.scale.float()[..., None], qp.zero.float()[..., None]  # [O, n_groups, 1]
    codes = torch.clamp(torch.round(_groups(w.float(), qp.n_groups) / scale) + zero, qlo, qhi)
    return codes.reshape(w.shape).to(torch.uint8)


def dequantize(codes: Tensor, qp: QParams) -> Tensor:
    """codes: [O, I] integer -> w: [O, I] float32, (code - zero) · scale per group."""
    if codes.dim() != 2:
        raise BadInput(f"expected codes of shape [out_features, in_features]; got {tuple(codes.shape)}")
    _check_params(codes.shape, qp)
    scale, zero = qp.scale.float()[..., None], qp.zero.float()[..., None]
    return ((_groups(codes.float(), qp.n_groups) - zero) * scale).reshape(codes.shape)


def fake_quantize(w: Tensor, qp: QParams) -> Tensor:
    """Quantize then dequantize, in w's dtype: what a layer computes with after quantization."""
    return dequantize(quantize(w, qp), qp).to(w.dtype)


def quantize_weight(w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                    per_tensor: bool = False, clip: bool = False) -> tuple[Tensor, QParams]:
    """Convenience: parameters and uint8 codes [O, I] in one call."""
    qp = compute_qparams(w, bits, group_size, symmetric=symmetric, per_tensor=per_tensor, clip=clip)
    return quantize(w, qp), qp


# ----------------------------------------------------------------------------------------------- metrics

def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(‖ref‖² / ‖ref - approx‖²) in dB; inf when equal."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum().item()
    if noise == 0:
        return math.inf
    signal = ref.pow(2).sum().item()
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def relative_error(ref: Tensor, approx: Tensor) -> float:
    """‖ref - approx‖ / ‖ref‖ (Frobenius); 0 when equal, inf when ref is 0 and approx is not."""
    ref, approx = ref.detach().double(), approx.detach().double()
    diff = torch.linalg.vector_norm(ref - approx).item()
    if diff == 0:
        return 0.0
    norm = torch.linalg.vector_norm(ref).item()
    return math.inf if norm == 0 else diff / norm


# --------------------------------------------------------------------------------------------- packing

def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of in_features codes takes (see the module docstring for the layouts)."""
    bits = check_bits(bits)
    if bits == 3:
        return 3 * -(-in_features // 8)
    return -(-in_features * bits // 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """codes: [O, I] uint8 in [0, 2^bits - 1] -> packed: [O, packed_row_bytes(I, bits)] uint8."""
    bits = check_bits(bits)
    if codes.dim() != 2 or codes.is_floating_point():
        raise BadInput(f"pack expects integer codes of shape [O, I]; got {codes.dtype} {tuple(codes.shape)}")
    O, I = codes.shape
    if codes.numel() and (codes.min().item() < 0 or codes.max().item() > 2**bits - 1):
        raise BadInput(f"codes must lie in [0, {2**bits - 1}] to pack at {bits} bits")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    # every 8 codes make exactly `bits` bytes: build the 8·bits-bit little-endian word, then cut it in bytes
    n = -(-I // 8)
    v = torch.zeros(O, n * 8, dtype=torch.int64, device=codes.device)
    v[:, :I] = codes.to(torch.int64)
    shifts = torch.arange(8, device=codes.device) * bits
    word = (v.view(O, n, 8) << shifts).sum(dim=-1, keepdim=True)  # [O, n, 1], < 2^56
    out = (word >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF  # [O, n, bits]
    return out.reshape(O, n * bits)[:, :packed_row_bytes(I, bits)].to(torch.uint8).contiguous()


def unpack(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """packed: [O, packed_row_bytes(in_features, bits)] uint8 -> codes: [O, in_features] uint8."""
    bits = check_bits(bits)
    nbytes = packed_row_bytes(in_features, bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != nbytes:
        raise BadInput(f"expected packed uint8 rows of {nbytes} bytes for {in_features} codes at {bits} bits; "
                       f"got {packed.dtype} {tuple(packed.shape)}")
    O = packed.shape[0]
    if bits == 8:
        return packed.clone()
    n = -(-in_features // 8)
    b = torch.zeros(O, n * bits, dtype=torch.int64, device=packed.device)
    b[:, :nbytes] = packed.to(torch.int64)
    word = (b.view(O, n, bits) << (torch.arange(bits, device=packed.device) * 8)).sum(dim=-1, keepdim=True)
    v = (word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)  # [O, n, 8]
    return v.reshape(O, n * 8)[:, :in_features].to(torch.uint8).contiguous()
