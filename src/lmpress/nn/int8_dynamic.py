"""W8A8 dynamic ("w8a8-dynamic"): int8 weights, activations quantized per token at run time, on PyTorch's int8 kernel.

Stored state (plain tensors; what is saved, exported and loaded):
  qweight  int8    [O, I]  symmetric per output channel: w ≈ qweight · scales[:, None], codes in −127..127
                           (never −128: scale = max|w_row| / 127, the correct signed range)
  scales   float32 [O]     float32, not fp16: the kernel multiplies by float32 scales, so the codes are chosen
                           with exactly the scale it uses (fp16 would also lose precision on small rows)
  bias     float32 [O]     when the layer has one
On disk that is 8 + 32/I bits per weight (8.06 for I = 576). In memory the kernel's packed copy of the weight
(a cache derived from the buffers, never saved, rebuilt when they change: load_state_dict, in-place edits;
see `_packed_weight`) adds another byte per weight.

The kernel: `torch.ops.quantized.linear_dynamic` on a weight prepacked by `torch.ops.quantized.linear_prepack`
(fbgemm under the "x86" and "fbgemm" engines, the default on x86 CPUs: u8·s8 → int32 products). What it does
with activations, found by experiment and emulated bit for bit in `emulate_kernel` (tests compare the two):
  - ONE scale and zero-point per call, for the whole input (per tensor, not per token): asymmetric uint8 from
    the input's min and max (widened to include 0, and to a scale of at least 6.1e-5), with reduce_range:
    codes 0..127, i.e. 7 bits. reduce_range stays on, as in torch.ao's dynamic Linear: without it, AVX2 CPUs
    lacking VNNI can saturate the int16 pair sums of vpmaddubsw (2·255·127 > 32767) and answer silently
    wrong, so a saved model would compute differently on different machines.
  - int32 accumulation, then y = fma(float(acc − zp·Σ_i q[o, i]), x_scale · w_scale[o], bias[o]).
Per-token scales come from a cheap wrapper around that per-tensor kernel, no per-row calls: with more than
one row, each row x_t is divided by r_t = max|x_t| before the call and its output (less the bias) multiplied
by r_t after it. Every row then lies in [−1, 1], so the kernel's one grid is, in each token's own units, a
grid of step ≈ 2·r_t/127 (r_t/127 for nonnegative rows): a token with large activations no longer coarsens
its neighbours' grid (on stories260K the per-token wrapper cuts the KLD to fp32 from 4.3e-3 to 1.2e-3).
With one row (decode) the division is skipped: the kernel's grid already is that token's own (asymmetric,
from its min and max), and the kernel is then the only op. One caveat of that path: a row whose whole range
is below 127 · 6.1e-5 ≈ 0.008 gets the floor scale, a coarser grid than its values deserve.

Speed (one core, this AMD EPYC with AVX-512 VNNI, benchmarks running beside it; medians, whole module call
vs nn.Linear): [1, 576]×[576→1536] 35 µs vs 77 µs (2.2×); [1, 896]×[896→4864] 83 µs vs 0.5–0.8 ms (6–10×);
[128, 576]×[576→1536] 0.73 ms vs 2.5 ms (3.5×). The kernel splits even one row across all intra-op
threads, so set threads to the cores that are really free: with 2 threads on 2 busy cores a call took 4–8 ms.

lmpress's native kernel (kernels.linear_w8a8) does the same quantization, integer products and float32 rounding
steps as the emulation, hence fbgemm's numbers bit for bit (tests/test_kernels.py), but measured side by side it
is no faster on this CPU (one thread, one row: 576→1536 38.0 vs 38.5 µs, 896→4864 165 vs 92 µs, 4864→896 108 vs
92 µs), so `native` is off and fbgemm does the work; set Int8DynamicLinear.native = True to use the kernel.

CPU only (PyTorch has no CUDA kernel for it); float32 compute, other float inputs are cast and cast back.
"""

from __future__ import annotations

import math
import re
import struct
import warnings

import torch

from .. import kernels
from ..errors import BadInput

FORMAT = "w8a8-dynamic"
QMAX = 127               # weight codes −127..127
REDUCE_RANGE = True      # activations 0..127 in the kernel (see the module docstring)
_TINY = 1e-30            # per-token scale floor: an all-zero row stays zero instead of 0/0


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: float [O, I] → (codes int8 [O, I] in −127..127, scales float32 [O]), symmetric per output channel."""
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise BadInput("cannot quantize a weight with inf or NaN values to int8")
    scales = w.abs().amax(dim=1) / QMAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: codes 0, scale 1
    codes = torch.round(w / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scales


def _prepack(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """The kernel's packed weight and bias (a TorchScript object, not a tensor: never part of the state)."""
    s = scales.detach().double()
    with warnings.catch_warnings():  # torch ≥ 2.10 flags quantized-tensor constructors as deprecated
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(qweight.detach(), s, torch.zeros_like(s, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


def _f32(v: float) -> float:
    """v rounded to float32 (to nearest), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _f32_overflows(v: float) -> bool:
    try:
        return math.isinf(_f32(v))
    except OverflowError:
        return True


def kernel_qparams(x_min: float, x_max: float, reduce_range: bool = REDUCE_RANGE) -> tuple[float, int]:
    """The activation (scale, zero_point) fbgemm's dynamic linear picks for a tensor spanning [x_min, x_max].

    A transcription of ATen's quant_utils::ChooseQuantizationParams(min, max, 0, 255, preserve_sparsity=False,
    force_scale_power_of_two=False, reduce_range): double arithmetic, the scale rounded to float32 at the end.
    """
    qmin, qmax = (0, 127) if reduce_range else (0, 255)
    lo, hi = min(x_min, 0.0), max(x_max, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if _f32(scale) == 0.0 or _f32_overflows(1.0 / _f32(scale)):  # fbgemm multiplies by 1/scale
        scale = 0.1
    small = _f32(6.1e-5)  # SMALL_SCALE_THRESHOLD (a float): narrower ranges are widened to this scale
    if scale < small:
        org, scale = scale, small
        if lo == 0.0:
            hi = _f32(small * (qmax - qmin))
        elif hi == 0.0:
            lo = _f32(-small * (qmax - qmin))
        else:
            amp = _f32(small / _f32(org))
            lo, hi = _f32(lo * amp), _f32(hi * amp)
    zp_from_min, zp_from_max = qmin - lo / scale, qmax - hi / scale
    err_min, err_max = abs(qmin) - abs(lo / scale), abs(qmax) - abs(hi / scale)
    zp0 = zp_from_min if err_min < err_max else zp_from_max
    zp = qmin if zp0 < qmin else qmax if zp0 > qmax else int(round(zp0))  # round(): half to even, as nearbyint
    return _f32(scale), zp


def emulate_kernel(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                   reduce_range: bool = REDUCE_RANGE) -> torch.Tensor:
    """Plain-torch emulation of torch.ops.quantized.linear_dynamic (fbgemm). x: float32 [M, I] → [M, O].

    Slow (float64 matmul, exact for the integer products); for tests and for reading what the kernel computes.
    """
    x = x.float()
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    x_scale, zp = kernel_qparams(lo, hi, reduce_range)  # one grid for the whole tensor
    # quantize: fma(x, 1/scale, zp) in float32, round half to even, saturate to uint8 (float64 makes the fma exact)
    inv = torch.tensor(1.0, dtype=torch.float32) / x_scale
    xq = (x.double() * inv.double() + zp).float().round().clamp(0, 255)  # xq: [M, I]
    q = qweight.double()                                                   # q: [O, I]
    acc = xq.double() @ q.t() - zp * q.sum(dim=1)                          # int32 values, exact in float64
    mult = torch.tensor(x_scale, dtype=torch.float32) * scales.float()     # mult: [O], float32 like fbgemm
    b = 0.0 if bias is None else bias.double()
    return (acc.float().double() * mult.double() + b).float()              # fma(float(acc), mult, bias)


class Int8WeightLinear(torch.nn.Module):
    """What the int8 formats share: int8 codes `qweight` [O, I] and float32 per-channel `scales` [O] (w ≈
    qweight·scale), the checks and casts around the kernel, and a packed-weight cache that is never copied."""

    format: str

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._pack, self._pack_key = None, None  # the kernel's packed weight, rebuilt from the buffers

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [O, I] the codes stand for (the reference weight)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def _forward_cast(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Inputs the kernel does not take as they are: checked, made float32 [M, I], and the result cast back."""
        if not x.is_cpu:
            raise BadInput(f"{self.format} layers run on the CPU (PyTorch's int8 kernel); got input on {x.device}")
        if x.dim() == 0 or x.shape[-1] != self.in_features or not x.is_floating_point():
            raise BadInput(f"expected a float input [..., {self.in_features}], got {x.dtype} {list(x.shape)}")
        y = fn(x.reshape(-1, self.in_features).float())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def __getstate__(self):  # copy.deepcopy / pickle: the packed cache is rebuilt, not copied
        return {**self.__dict__, "_pack": None, "_pack_key": None}

    def stored_bits_per_weight(self) -> float:
        """Bits per weight of the stored codes and scales (not the bias)."""
        return 8 + 32 / self.in_features


class Int8DynamicLinear(Int8WeightLinear):
    """A Linear whose weight is int8 per output channel and whose activations are quantized per token at run time.

    Build one with `from_linear(linear)`, or `empty(in_features, out_features, bias)` to load a saved state into.
    """

    format = FORMAT
    native = False  # fbgemm measured as fast or faster than kernels.linear_w8a8 (module docstring)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8DynamicLinear:
        return cls(in_features, out_features, bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8DynamicLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scales = quantize_weight(linear.weight)
        m.qweight.copy_(codes)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def _packed_weight(self):
        # Rebuilt when the buffers are replaced or written in place (load_state_dict copies in place, which
        # bumps _version): a few attribute reads per call, no hook to forget.
        b = self.bias
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version,
               None if b is None else (b.data_ptr(), b._version))
        if key != self._pack_key:
            self._pack, self._pack_key = _prepack(self.qweight, self.scales, b), key
        return self._pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., I] float32 → [..., O] float32 (the kernel flattens leading dimensions itself)
        if x.dtype is not torch.float32 or x.dim() < 2 or not x.is_cpu or x.shape[-1] != self.in_features:
            return self._forward_cast(x, self.forward)
        if self.native and kernels.usable(x):  # lmpress's own kernel: the same integer arithmetic, bit for bit
            mode = "dynamic" if x.numel() <= self.in_features else "dynamic-per-token"
            return kernels.linear_w8a8(x, self.qweight, self.scales, self.bias, mode)
        packed = self._packed_weight()
        if x.numel() <= self.in_features:  # one row (decode): the kernel's per-tensor grid is this token's own
            return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)  # W·x + b
        r = x.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY)  # r: [..., 1], per-token scale
        y = torch.ops.quantized.linear_dynamic(x / r, packed, REDUCE_RANGE)  # W·(x/r) + b
        return self._unscale(y, r)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with the kernel replaced by its plain-torch emulation (`emulate_kernel`); slow."""
        if x.dtype is not torch.float32 or x.dim() < 2 or not x.is_cpu or x.shape[-1] != self.in_features:
            return self._forward_cast(x, self.forward_reference)
        x2 = x.reshape(-1, self.in_features)  # x2: [M, I]
        if x2.shape[0] <= 1:
            y = emulate_kernel(x2, self.qweight, self.scales, self.bias)
        else:
            r = x2.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY)
            y = self._unscale(emulate_kernel(x2 / r, self.qweight, self.scales, self.bias), r)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _unscale(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # The packed weight carries the bias (one op fewer on the decode path), so y = W·(x/r) + b here:
        # take b off, scale the row back by r, put b back.
        if self.bias is None:
            return y.mul_(r)
        b = self.bias.float()
        return y.sub_(b).mul_(r).add_(b)

    def lmpress_format(self) -> dict:
        return {"format": self.format, "bits": 8, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "activations": "dynamic-per-token", "activation_range": "uint8 0..127 (reduce_range)",
                "scales_dtype": "float32"}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, w8a8 dynamic"
