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
row), and for bits 2 and 3 (kernels.linear_lowbit, float32 activations) when it spans whole chunks of 8. At bits
4 and 8 the activations of such inputs are rounded to int8 per block of 32 columns (`native_act = "q8"`, the
default: llama.cpp's Q8_0 arithmetic, integer dot products, about 3× faster than float ones), a rounding that
forward_reference() applies to the same inputs too, so both paths compute the same numbers up to float summation
order on every device and with the kernels on or off. The int8 rounding moves outputs by about 1% of their
scale (relative RMS and max, measured on random layers with outlier channels), as llama.cpp's Q8_0 activations
do; `native_act = "f32"` (on the class or a layer) keeps the activations float32.
Everything else — widths 5 to 7, prefill-sized inputs, grouping the kernels do not take — dequantizes the whole
weight, then runs a float matmul: on CPU float32 inputs that need no gradient, the native kernels write the
weight (bit for bit the reference's, any width 2..8) into a scratch buffer reused across layers
(kernels.dequantize_packed, kernels.scratch), otherwise (inputs that need gradients, other devices or dtypes,
LMPRESS_KERNELS=0, no library) forward_reference() does it in torch. Both give the same numbers.
The kernel's arguments (buffer addresses, shapes) are derived once and kept while the buffers stay the same
objects at the same version (no state is added: nothing is saved).
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
    native_bits = (4, 8)  # widths with a native "q8"/"f32" kernel (2 and 3: kernels.linear_lowbit, float32 only)
    native_act = "q8"     # activations of inputs of ≤ kernels.MAX_ROWS rows: "q8" or "f32" (see lmpress.kernels)
    _kargs = None         # derived kernel arguments and the buffers (and versions) they were taken from

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

    def _kernel_args(self) -> tuple:
        """(gemv, dequant): the arguments of kernels._native.linear — (I, qweight, row bytes, O, bits, scales,
        zeros, group, bias) addresses, or None when no GEMV kernel takes this layer — and of kernels._native.dequant
        — (I, O, qweight, row bytes, bits, scales, zeros, scales fp16, group, bias tensor), or None; derived again
        when a buffer is replaced or written in place."""
        b = self._buffers
        qw, sc, ze, bias = b["qweight"], b["scales"], b["zeros"], b["bias"]
        c = self._kargs
        if (c is not None and c[0] is qw and c[1] is sc and c[2] is ze and c[3] is bias and c[4] == qw._version
                and c[5] == sc._version and c[6] == ze._version and c[7] == (bias._version if bias is not None else 0)):
            return c[8]
        gemv = dq = None
        plain = (qw.device.type == "cpu" and qw.dtype == torch.uint8 and qw.is_contiguous() and sc.is_contiguous()
                 and ze.is_contiguous() and sc.dtype == ze.dtype and sc.device.type == ze.device.type == "cpu"
                 and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.is_cpu)))
        if plain and sc.dtype == torch.float16 and (
                (self.bits in self.native_bits and kernels.group_ok(self.group_size, self.in_features))
                or kernels.lowbit_ok(self.bits, self.group_size, self.in_features)):
            gemv = (self.in_features, qw.data_ptr(), qw.shape[1], self.out_features, self.bits, sc.data_ptr(),
                    ze.data_ptr(), self.group_size or 0, 0 if bias is None else bias.data_ptr())
        if plain and sc.dtype in (torch.float16, torch.float32):
            dq = (self.in_features, self.out_features, qw.data_ptr(), qw.shape[1], self.bits, sc.data_ptr(),
                  ze.data_ptr(), int(sc.dtype == torch.float16), self.group_size or 0, bias)
        args = (gemv, dq)
        self._kargs = (qw, sc, ze, bias, qw._version, sc._version, ze._version,
                       bias._version if bias is not None else 0, args)
        return args

    def _act(self, x: torch.Tensor) -> str:
        """The activation arithmetic of this input on the native path: "q8" for inputs a kernel takes (up to
        kernels.MAX_ROWS rows, no gradient needed) when native_act is "q8", else "f32"."""
        if (self.native_act == "q8" and self.bits in self.native_bits and x.numel() <= kernels.MAX_ROWS * x.shape[-1]
                and kernels.group_ok(self.group_size, self.in_features)
                and not (x.requires_grad and torch.is_grad_enabled())):
            return "q8"
        return "f32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode hot path: a few attribute reads before the kernel (see kernels.linear_packed for the checks)
        n = x.shape[-1]
        rows = x.numel() // n if n else 0
        if (x.dtype is torch.float32 and x.is_cpu and kernels.ENABLED and kernels._native is not None
                and not (x.requires_grad and torch.is_grad_enabled())):
            gemv, dq = self._kernel_args()
            cap = kernels.ISA_CAP
            if gemv is not None and 0 < rows <= kernels.MAX_ROWS and n == gemv[0]:
                I, w, rb, O, bits, sc, ze, g, bias = gemv
                x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(rows, n).contiguous()
                y = torch.empty(rows, O)
                isa, threads = kernels._isa(cap) if cap else -1, kernels._threads or torch.get_num_threads()
                if bits in kernels.LOWBITS:  # float32 activations (no "q8" kernel at these widths)
                    kernels._native.lowbit(x2.data_ptr(), rows, I, w, rb, O, bits, sc, ze, g, bias, y.data_ptr(),
                                           isa, threads)
                else:
                    kernels._native.linear(x2.data_ptr(), rows, I, w, rb, O, bits, 1, sc, ze, 1, g, bias,
                                           y.data_ptr(), 1 if self.native_act == "q8" else 0, isa, threads)
                return y if x.dim() == 2 else y.view(*x.shape[:-1], O)
            if dq is not None and n == dq[0] and (rows > kernels.MAX_ROWS or self._act(x) == "f32"):
                # prefill, evaluation batches, widths without a GEMV kernel: the reference's float weight, bit for
                # bit, dequantized natively into this thread's scratch buffer, then torch's float matmul
                I, O, w, rb, bits, sc, ze, sf16, g, bias = dq
                buf = kernels.scratch(O * I)
                # on one thread: torch's matmul right after runs on its own OpenMP threads, which keep spinning
                # between calls; a second pool of ours fighting them for the cores made 2-thread prefill slower
                # than 1-thread (SmolLM2 w4g128, 64-token prompt: 360 → 440 tok/s at 2 threads this way)
                kernels._native.dequant(w, rb, O, I, bits, sc, ze, sf16, g, buf.data_ptr(),
                                        kernels._isa(cap) if cap else -1, 1)
                return F.linear(x, buf[:O * I].view(O, I), bias)
        elif kernels._native is None and kernels.ENABLED:
            kernels.available()  # the one warning that the library is missing
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a float matmul; inputs the native path would round to int8 ("q8") rounded alike."""
        if self._act(x) == "q8":
            from ..kernels.reference import quantize_q8

            x = quantize_q8(x.reshape(-1, x.shape[-1])).to(x.dtype).reshape(x.shape)
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
