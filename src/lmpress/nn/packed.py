"""Weight-only quantized linear layers: integer codes packed along rows, fp16 scales and zero-points.

Stored state (what is saved, exported and, later, read by native kernels):
  qweight  uint8 [O, packed_row_bytes(I, bits)]  each output row's codes, packed as quant.primitives.pack
                                                  lays them out (rows contiguous, byte-aligned)
  scales   fp16  [n_groups, O]                    group-major: all rows' scales of group 0, then group 1, ...
  zeros    fp16  [n_groups, O]                    w ≈ (code − zero) · scale; symmetric formats store 2^(b−1)
  bias     fp32  [O]                              when the layer has one
with n_groups = ceil(I / group_size) (1 for per-channel). When group_size does not divide I (SmolLM2's 576
columns in groups of 128), the last group is partial: the weight is padded with zero columns to whole groups
for choosing scales and codes, and only the I real codes are stored. One class serves bits 2..8: the format
name says the width ("packed-int4"), the manifest entry carries bits and group size.

forward() runs the native kernels (lmpress.kernels) for bits 4 and 8 on CPU float32 inputs of up to
kernels.MAX_ROWS rows (decode, small batches) when the group size spans whole blocks of 32 columns (or the whole
row). Activations stay float32 by default, so the result is the reference's up to float summation order; a layer's
`native_act = "q8"` rounds them to int8 per block of 32 for integer dot products (faster, llama.cpp's Q8_0
arithmetic, no longer the reference's numbers).
Everything else — other widths, prefill-sized inputs, grouping the kernels do not take, LMPRESS_KERNELS=0 —
takes forward_reference(): dequantize the whole weight, then a float matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant.primitives import QParams, dequantize, pack, packed_row_bytes, unpack


def pad_to_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """w [O, I] with zero columns appended up to a whole number of groups (unchanged when they divide I)."""
    if not group_size or w.shape[1] % group_size == 0:
        return w
    return F.pad(w, (0, group_size - w.shape[1] % group_size))


class PackedLinear(torch.nn.Module):
    formats = tuple(f"packed-int{b}" for b in range(2, 9))
    native_bits = (4, 8)  # widths with a native kernel
    native_act = "f32"    # activations of the native kernel: "f32" or "q8" (see lmpress.kernels)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 symmetric: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = -(-in_features // group_size) if group_size else 1
        self.register_buffer("qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def format(self) -> str:
        return f"packed-int{self.bits}"

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
              symmetric: bool = False) -> PackedLinear:
        return cls(in_features, out_features, bits, group_size, bias, symmetric)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qp: QParams, bias: torch.Tensor | None,
                   symmetric: bool = False) -> PackedLinear:
        """codes: uint8 [O, I] in [0, 2^bits) (the real columns only); qp.scale/zero: [O, n_groups]."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, qp.bits, qp.group_size, bias is not None, symmetric)
        m.qweight.copy_(pack(codes, qp.bits))
        m.scales.copy_(qp.scale.t())
        m.zeros.copy_(qp.zero.t())
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def qparams(self) -> QParams:
        return QParams(scale=self.scales.t().float(), zero=self.zeros.t().float(), bits=self.bits,
                       group_size=self.group_size)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight [O, I] the stored codes represent."""
        codes = pad_to_groups(self.codes(), self.group_size)
        return dequantize(codes, self.qparams())[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits in self.native_bits and kernels.usable(x) and kernels.group_ok(self.group_size, self.in_features):
            return kernels.linear_packed(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                         self.bias, act=self.native_act)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def lmpress_format(self) -> dict:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def stored_bits_per_weight(self) -> float:
        """Bits per weight of this layer's stored state (codes, scales and zeros; not the bias)."""
        n = self.in_features * self.out_features
        return 8 * (self.qweight.numel() + 2 * self.scales.numel() + 2 * self.zeros.numel()) / n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"{'sym' if self.symmetric else 'asym'}")
