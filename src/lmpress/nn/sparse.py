"""Sparse linear layers stored as a bitmask plus the non-zero values ("sparse-bitmask").

Stored state (what is saved and loaded):
  mask    uint8 [O, ceil(I / 8)]  bit j % 8 (least significant first) of byte j // 8 of row o: w[o, j] != 0
  values  [nnz]                   the non-zero weights in row-major order, in the layer's float dtype
  bias    [O]                     when the layer has one
A float32 layer at sparsity s takes 32·(1 − s) + 1 bits per weight: 17 at 50% (53% of dense), 9 at 75%.

forward() is the reference path: the dense weight is rebuilt once (cached, not saved; rebuilt after
load_state_dict) and multiplied densely. On CPU a sparse matmul does not beat it at these sparsities: with
torch's CSR kernel, [1, 576] × [576 → 1536] at 50% took 484 µs against 96 µs dense (5× slower, one
thread, this machine; benchmarks/structure.py's sparse-matmul row), as is usual below ~90–95% sparsity for unstructured patterns.
So the format saves disk and load bandwidth, not compute; the dense cache costs the dense memory at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORMAT = "sparse-bitmask"
_BITS = 1 << torch.arange(8, dtype=torch.uint8)  # [8]: bit values, least significant first


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool [O, I] → uint8 [O, ceil(I/8)]."""
    O, I = keep.shape
    padded = F.pad(keep.to(torch.uint8), (0, -I % 8)).reshape(O, -1, 8)
    return (padded * _BITS).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [O, ceil(I/8)] → bool [O, I]."""
    bits = (packed[..., None] & _BITS) != 0  # [O, B, 8]
    return bits.reshape(packed.shape[0], -1)[:, :in_features]


class SparseLinear(torch.nn.Module):
    format = FORMAT

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool, dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dt = getattr(torch, dtype)
        self.register_buffer("mask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8))
        self.register_buffer("values", torch.zeros(nnz, dtype=dt))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dt) if bias else None)
        self._dense: torch.Tensor | None = None

    @classmethod
    def empty(cls, in_features: int, out_features: int, nnz: int, bias: bool, dtype: str = "float32") -> SparseLinear:
        return cls(in_features, out_features, nnz, bias, dtype)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
        """w [O, I] float (its zeros become the mask), bias [O] or None."""
        w = w.detach()
        keep = w != 0
        m = cls(w.shape[1], w.shape[0], int(keep.sum()), bias is not None, str(w.dtype).removeprefix("torch."))
        m.mask.copy_(pack_mask(keep))
        m.values.copy_(w[keep])
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def dequantize(self) -> torch.Tensor:
        """The dense weight [O, I]."""
        keep = unpack_mask(self.mask, self.in_features)
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        w[keep] = self.values
        return w

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.device != x.device:
            self._dense = self.dequantize()
        return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def lmpress_format(self) -> dict:
        return {"format": FORMAT, "in_features": self.in_features, "out_features": self.out_features,
                "nnz": self.values.numel(), "bias": self.bias is not None,
                "dtype": str(self.values.dtype).removeprefix("torch.")}

    def stored_bits_per_weight(self) -> float:
        n = self.in_features * self.out_features
        return 8 * (self.mask.numel() + self.values.numel() * self.values.element_size()) / n

    def extra_repr(self) -> str:
        n = self.in_features * self.out_features
        return f"in={self.in_features}, out={self.out_features}, sparsity={1 - self.values.numel() / n:.3f}"
