"""W8A8 static ("w8a8-static"): int8 weights, activations on a fixed grid calibrated beforehand, on an int8 kernel.

Stored state (plain tensors; what is saved, exported and loaded):
  qweight      int8    [O, I]  as w8a8-dynamic: symmetric per output channel, codes −127..127, w ≈ qweight · scales
  scales       float32 [O]     (see nn/int8_dynamic.py for why float32)
  input_scale  float32 [1]     the activation grid, one for the whole input (per tensor), from calibration
  input_zero   int32   [1]     (quant/activations.py): x ≈ (code − input_zero) · input_scale, codes uint8 0..127
  bias         float32 [O]     when the layer has one
The activation codes are 0..127 (7 bits, "reduce_range"), not 0..255, for the reason given in int8_dynamic.py:
AVX2 CPUs without VNNI can saturate the kernel's int16 pair sums with 8-bit activations, and a saved model must
compute the same on every machine. Inputs outside the calibrated range saturate to the grid's ends.

The kernel: `torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32` on the weight prepacked by
`torch.ops.quantized.linear_prepack` (fbgemm, under the default "x86" and "fbgemm" engines): float32 input and a
given activation (scale, zero point) in, float32 out, one op. It quantizes x inside the kernel exactly as the
dynamic one does (fma(x, 1/scale, zero) in float32, round half to even, saturate to 0..255), accumulates the
u8·s8 products in int32 and rescales: y = fma(float(acc − zero·Σ_i q[o, i]), scale · w_scale[o], bias[o]). The
kernel saturates at 255, so forward first clamps x at the top of the 0..127 grid, (127 − zero) · scale in
float32 (one cheap op); below, the kernel's own saturation at 0 is the grid's. `emulate_static_kernel` writes
that math out in plain torch and the tests compare the two bit for bit.
Chosen over `torch._int_mm` (int8 × int8 → int32, on the CPU too), whose matmul alone takes about what this whole
fused call takes (36 µs vs 28 µs for one row below) and which needs half a dozen ops around it (quantize, cast,
zero-point correction, rescale, bias); and over `torch.ops.quantized.linear`, whose output is requantized to
uint8 (a second, output, grid to calibrate).

Speed (one thread, AMD EPYC with AVX-512 VNNI, benchmarks running beside it; medians of the whole call vs
nn.Linear): [1, 576]×[576→1536] 34 µs vs 77 µs (2.3×, as w8a8-dynamic's 35 µs); [128, 576] 0.98 ms vs
3.7 ms (3.8×).

Inputs of up to kernels.MAX_ROWS rows run on lmpress's native kernel (kernels.linear_w8a8, mode "static"), which
computes what emulate_static_kernel writes out, bit for bit.

Under a quantized engine whose packed weight lacks the op (torch.backends.quantized.engine = "onednn", tested),
forward runs the plain-torch emulation instead: slow, and the same numbers. CPU only; float32 compute, other float
inputs are cast and cast back.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..errors import BadInput
from . import linear_weight
from .int8_dynamic import Int8WeightLinear, _prepack, quantize_weight

FORMAT = "w8a8-static"
ACT_QMIN, ACT_QMAX = 0, 127  # activation codes: uint8, reduce_range


def quantize_input(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """x float → its activation codes as float32, 0..127, rounded as the kernel rounds (fma in float32, ties to
    even)."""
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return (x.double() * inv.double() + zero).float().round().clamp(ACT_QMIN, ACT_QMAX)  # double makes the fma exact


def emulate_static_kernel(x: torch.Tensor, scale: float, zero: int, qweight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch emulation of forward()'s integer math. x: float32 [M, I] → [M, O]. Slow; for tests and reading."""
    xq = quantize_input(x.float(), scale, zero)                           # xq: [M, I] codes 0..127
    q = qweight.double()                                                  # q: [O, I]
    acc = xq.double() @ q.t() - zero * q.sum(dim=1)                       # int32 values, exact in float64
    mult = torch.tensor(scale, dtype=torch.float32) * scales.float()      # mult: [O], float32 like fbgemm
    b = 0.0 if bias is None else bias.double()
    return (acc.float().double() * mult.double() + b).float()             # fma(float(acc), mult, bias)


def check_input_qparams(scale, zero) -> tuple[float, int]:
    """(scale, zero) as the module stores them: scale a positive float32 with a finite inverse, zero an
    integer in 0..127. Raises BadInput otherwise."""
    try:
        s32 = torch.tensor(float(scale), dtype=torch.float32)
        z = float(zero)
    except (TypeError, ValueError, RuntimeError):
        raise BadInput(f"w8a8-static: input_scale and input_zero must be numbers; got {scale!r}, {zero!r}") from None
    if not (torch.isfinite(s32) and s32 > 0 and torch.isfinite(1.0 / s32)):
        raise BadInput(f"w8a8-static: input_scale must be a positive finite number; got {scale!r}")
    if isinstance(zero, bool) or not z.is_integer() or not ACT_QMIN <= z <= ACT_QMAX:
        raise BadInput(f"w8a8-static: input_zero must be an integer in {ACT_QMIN}..{ACT_QMAX}; got {zero!r}")
    return float(s32), int(z)


class Int8StaticLinear(Int8WeightLinear):
    """A Linear with int8 per-channel weights and a static int8 activation grid (one scale and zero point).

    Build one with `from_linear(linear, input_scale, input_zero)` (the grid from quant.activations'
    observers), or `empty(in_features, out_features, bias)` to load a saved state into.
    """

    format = FORMAT

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("input_zero", torch.zeros(1, dtype=torch.int32))

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8StaticLinear:
        return cls(in_features, out_features, bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, input_scale: float, input_zero: int) -> Int8StaticLinear:
        """linear: nn.Linear (or GPT-2's Conv1D); (input_scale, input_zero): the calibrated activation grid."""
        scale, zero = check_input_qparams(input_scale, input_zero)
        w = linear_weight(linear)  # [O, I]
        m = cls(w.shape[1], w.shape[0], linear.bias is not None)
        codes, scales = quantize_weight(w)
        m.qweight.copy_(codes)
        m.scales.copy_(scales)
        m.input_scale.fill_(scale)
        m.input_zero.fill_(zero)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def input_qparams(self) -> tuple[float, int]:
        """The stored activation grid (scale, zero)."""
        return float(self.input_scale), int(self.input_zero)

    def input_range(self) -> tuple[float, float]:
        """The float32 interval the grid covers; inputs outside it saturate."""
        s, z = self.input_qparams()
        f32 = torch.tensor([ACT_QMIN - z, ACT_QMAX - z], dtype=torch.float32) * torch.tensor(s)
        return float(f32[0]), float(f32[1])

    def _packed(self):
        # The kernel's packed weight and (scale, zero, top clamp), rebuilt when a buffer is replaced or written
        # in place (load_state_dict copies in place, which bumps _version).
        # (read through _buffers and spelled out: this runs on every call, and is then 1 µs rather than 5)
        bufs = self._buffers
        q, w_s, xs, xz, b = bufs["qweight"], bufs["scales"], bufs["input_scale"], bufs["input_zero"], bufs["bias"]
        key = (q.data_ptr(), q._version, w_s.data_ptr(), w_s._version, xs.data_ptr(), xs._version, xz.data_ptr(),
               xz._version, None if b is None else (b.data_ptr(), b._version))
        if key != self._pack_key:
            s, z = self.input_qparams()
            self._pack = (_prepack(q, w_s, b), s, z, self.input_range()[1])
            self._pack_key = key
        return self._pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., I] float32 → [..., O] float32 (the kernel flattens leading dimensions itself)
        if x.dtype is not torch.float32 or x.dim() < 2 or not x.is_cpu or x.shape[-1] != self.in_features:
            return self._forward_cast(x, self.forward)
        if kernels.usable(x):  # lmpress's own kernel: the emulation's arithmetic, bit for bit (see int8_dynamic.py)
            s, z = self.input_qparams()
            return kernels.linear_w8a8(x, self.qweight, self.scales, self.bias, "static", s, z)
        packed, s, z, top = self._packed()
        try:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.clamp_max(top), s, z, packed)
        except RuntimeError as e:  # a quantized engine other than fbgemm ("onednn", "qnnpack") lacks this op:
            if "not implemented" not in str(e):  # the same math in plain torch, slow but the same numbers
                raise
            return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with the kernel replaced by its plain-torch emulation; slow."""
        if x.dtype is not torch.float32 or x.dim() < 2 or not x.is_cpu or x.shape[-1] != self.in_features:
            return self._forward_cast(x, self.forward_reference)
        s, z = self.input_qparams()
        y = emulate_static_kernel(x.reshape(-1, self.in_features), s, z, self.qweight, self.scales, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def lmpress_format(self) -> dict:
        return {"format": self.format, "bits": 8, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "activations": "static-per-tensor", "activation_range": "uint8 0..127 (reduce_range)",
                "scales_dtype": "float32"}

    def extra_repr(self) -> str:
        s, z = self.input_qparams()
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, w8a8 static "
                f"(input scale={s:.4g}, zero={z})")
