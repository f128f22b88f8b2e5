"""Native CPU kernels for quantized linear layers, and the switches around them.

The C++ library (csrc/, built at install by setup.py as the optional extension `lmpress.kernels._native`) computes
y[M, O] = x[M, I]·Wᵀ + b reading lmpress's stored formats directly, from raw buffer addresses (it is not linked
against libtorch), with the GIL released, on a small thread pool of its own:

  linear_packed  PackedLinear "packed-int4" / "packed-int8": codes packed as quant.primitives.pack, fp16 scales and
                 zeros [n_groups, O], symmetric or not. Groups must span whole blocks of 32 columns (group_size a
                 multiple of 32) or the whole row (per channel); only the row's last group/block may be partial.
  linear_lowbit  PackedLinear "packed-int2" / "packed-int3" with float32 activations: 8 codes per `bits` bytes,
                 groups of a multiple of 8 columns or the whole row (decode of 2- and 3-bit models)
  linear_int8    the int8 codes and fp32 per-channel scales of Int8WeightLinear, weight-only (fp32 activations)
  dequantize_packed  PackedLinear's float32 weight [O, I] of any width 2..8 and any group size, bit for bit
                 quant.primitives.dequantize ((code − zero) then · scale, two rounded float32 steps): the layers'
                 path for inputs of more than MAX_ROWS rows (prefill, evaluation batches) writes it into a scratch
                 buffer reused across layers (scratch()) and runs torch's float matmul on it
  linear_float   a float32 nn.Linear weight [O, I] for inputs of a few rows (NativeRunner's per-op path: speculative
                 verification, batched decode), where torch's GEMM costs about one GEMV per row: each tile of 4
                 weight rows is read from memory once for all the rows
  linear_w8a8    the same storage with activations on one uint8 grid per call: the integer arithmetic of PyTorch's
                 fbgemm quantized linear, which the w8a8 formats are defined by (nn/int8_dynamic.py)

Activations (act=) for the weight-only kernels: "f32" multiplies the decoded codes with x in float32 (the reference
numbers up to summation order), "q8" first rounds x to int8 per block of 32 columns (scale max|x|/127, as
llama.cpp's Q8_0) once per call and takes integer dot products (vpmaddubsw, or vpdpbusd with AVX512-VNNI; int4
64 columns per 32-byte load, 8 output rows per pass over the activations), then differs from the reference by
that rounding. PackedLinear uses "q8" for inputs of up to MAX_ROWS rows by default (nn/packed.py).
reference.py holds a plain-torch twin of each kernel, used by the tests.

The fused decode step (csrc/decode.cpp) runs one token through a whole Llama-family model in one call, the GIL
released, for NativeRunner.decode of one row: decode_plan() registers the model once — per layer a descriptor of
raw buffer addresses (fused_packed, fused_w8a8, fused_float: the same kernels and activation arithmetic as those
layers' own forward), the norms, RoPE tables and KV caches — and decode_step() writes one token's logits. The
caller keeps every tensor a plan points into alive, and unchanged in place, for as long as it uses the plan.

Instruction paths, chosen at run time: "vnni" (AVX2 + AVX512-VNNI/VL on 256-bit registers), "avx2" (AVX2 + FMA +
F16C) and "scalar" (portable C++, any CPU). Other widths (int5/6/7, and int2/3 in groups not a multiple of 8) have no native GEMV kernel: their layers
keep the dequantize-then-matmul arithmetic, as do inputs with more than MAX_ROWS rows (prefill: a float matmul
is compute-bound there and as fast); on CPU float32 inputs without gradients the dequantization itself is native
(dequantize_packed). Inputs that need gradients and non-CPU or non-float32 inputs take the torch reference.

Switches (for benchmarks and tests; nothing global is needed in normal use):
  LMPRESS_KERNELS=0          never use the native kernels (the reference path everywhere, no fused decode step); read
                             at import into ENABLED, which tests may set directly
  LMPRESS_KERNELS_ISA=scalar cap the instruction path (scalar, avx2 or vnni; ISA_CAP); or isa= per call
  set_num_threads(n)         the kernels' threads (default: torch.get_num_threads() at each call)
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

try:
    from . import _native
    _WHY = ""
except ImportError as e:  # not built (no compiler at install, an unsupported platform): the reference path
    _native, _WHY = None, str(e)

ISAS = {"scalar": 0, "avx2": 1, "vnni": 2}
ACTS = {"f32": 0, "q8": 1}
BLOCK = 32      # columns per SIMD block (and per activation scale in "q8" mode)
MAX_ROWS = 16   # inputs with more rows go to the reference path
W8A8_MODES = {"dynamic": 0, "dynamic-per-token": 1, "static": 2}

_threads: int | None = None
_warned = False
# the environment switches, read once (tests and benchmarks may assign these two directly)
ENABLED = os.environ.get("LMPRESS_KERNELS", "1") != "0"
ISA_CAP = os.environ.get("LMPRESS_KERNELS_ISA") or None


def available() -> bool:
    """True when the native library is loaded and not switched off by LMPRESS_KERNELS=0."""
    global _warned
    if _native is None:
        if not _warned and ENABLED:
            _warned = True
            warnings.warn(f"lmpress: native kernels not available ({_WHY}); quantized layers use the slower torch "
                          "reference path. Reinstall with a C++ compiler (pip install -e .) to build them.",
                          RuntimeWarning, stacklevel=3)
        return False
    return ENABLED


def isa() -> str:
    """The instruction path the kernels take on this CPU (before any cap), or "none" without the library."""
    if _native is None:
        return "none"
    return {v: k for k, v in ISAS.items()}[_native.isa()]


def set_num_threads(n: int | None) -> None:
    """Threads for the native kernels; None follows torch.get_num_threads()."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1; got {n}")
    _threads = n


def get_num_threads() -> int:
    return _threads or torch.get_num_threads()


@contextlib.contextmanager
def torch_on_one_thread(enabled: bool = True):
    """torch's own ops on one thread, the native kernels on the threads they had (when `enabled`): for a forward
    pass of a few
    rows (speculative verification, batched decode), whose heavy work is the native kernels'. torch's OpenMP
    workers gain nothing on ops that small, and they spin for a while after each one, taking the second core
    from the kernels' pool: a 5-row pass through Qwen2.5-1.5B at 2 threads took 477 ms with them, 284 ms
    without (the one-row decode step: 196 ms)."""
    global _threads
    saved_torch, saved = torch.get_num_threads(), _threads
    if not enabled or saved_torch == 1:
        yield
        return
    _threads = get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved_torch)
        _threads = saved


def usable(x: torch.Tensor) -> bool:
    """Whether an input can take a native kernel: CPU float32, at most MAX_ROWS rows, no gradient needed."""
    return (x.dtype is torch.float32 and x.is_cpu and x.numel() <= MAX_ROWS * x.shape[-1]
            and not (x.requires_grad and torch.is_grad_enabled()) and available())


def group_ok(group_size: int | None, in_features: int) -> bool:
    """Whether the kernels take this grouping: whole blocks of 32 columns per group, or one group per row."""
    return not group_size or group_size >= in_features or group_size % BLOCK == 0


def _isa(isa: str | None) -> int:
    name = isa or ISA_CAP
    if not name:
        return -1
    if name not in ISAS:
        raise ValueError(f"unknown instruction path {name!r}; choose from {', '.join(ISAS)}")
    return ISAS[name]


def _ptr(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if not t.is_contiguous():
        raise ValueError(f"lmpress kernels need contiguous buffers; got one of shape {tuple(t.shape)}")
    return t.data_ptr()


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dtype is not torch.float32 or x.shape[-1] != in_features:
        raise ValueError(f"expected float32 [..., {in_features}]; got {x.dtype} {list(x.shape)}")
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, in_features).contiguous()


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[1])


def tile_params(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """PackedLinear's fp16 scales and zeros [n_groups, O] regrouped per tile of 8 output rows: uint16
    [O // 8, n_groups, 16] (a tile's 8 scales, then its 8 zeros, per group; zeros None: 0). linear_packed(tiles=)
    of one activation row reads them in order there instead of 2·n_groups scattered lines per tile; derive it
    again whenever scales or zeros change."""
    ng, O = scales.shape
    if scales.dtype != torch.float16 or (zeros is not None and (zeros.dtype != torch.float16 or zeros.shape != scales.shape)):
        raise ValueError(f"tile_params takes fp16 scales and zeros of one shape; got {scales.dtype} {list(scales.shape)}")
    out = torch.empty(O // 8, ng, 16, dtype=torch.int16)
    _native.tile_params(_ptr(scales), _ptr(zeros), ng, O, _ptr(out))
    return out


def linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int | None, bias: torch.Tensor | None = None, act: str = "f32",
                  isa: str | None = None, threads: int | None = None,
                  tiles: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., I] float32 · PackedLinear weight (bits 4 or 8) → [..., O] float32.

    qweight uint8 [O, packed_row_bytes(I, bits)], scales and zeros fp16 [n_groups, O], bias float32 [O] or None.
    tiles: tile_params(scales, zeros), kept by a caller that runs the layer often (one row, "q8", several groups:
    the kernel regroups them itself on each such call otherwise).
    """
    O, I = qweight.shape[0], x.shape[-1]
    if bits not in (4, 8) or not group_ok(group_size, I) or scales.dtype != torch.float16 or zeros.dtype != torch.float16:
        raise ValueError(f"no native kernel for bits={bits}, group_size={group_size}, in_features={I}, "
                         f"scales {scales.dtype}, zeros {zeros.dtype}")
    x2 = _rows(x, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    if tiles is not None and (tiles.dtype != torch.int16 or tiles.shape != (O // 8, scales.shape[0], 16)):
        raise ValueError(f"tiles must be tile_params(scales, zeros): int16 [{O // 8}, {scales.shape[0]}, 16]")
    _native.linear(_ptr(x2), x2.shape[0], I, _ptr(qweight), qweight.shape[1], O, bits, 1, _ptr(scales),
                   _ptr(zeros), 1, group_size or 0, _ptr(bias), _ptr(y), ACTS[act], _isa(isa),
                   threads or get_num_threads(), _ptr(tiles))
    return _shaped(y, x)


LOWBITS = (2, 3)  # widths of linear_lowbit


def lowbit_ok(bits: int, group_size: int | None, in_features: int) -> bool:
    """Whether linear_lowbit takes this layer: 2 or 3 bits, groups of a multiple of 8 columns or one per row."""
    return bits in LOWBITS and (not group_size or group_size >= in_features or group_size % 8 == 0)


def linear_lowbit(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int | None, bias: torch.Tensor | None = None, isa: str | None = None,
                  threads: int | None = None) -> torch.Tensor:
    """x [..., I] float32 · PackedLinear weight of 2 or 3 bits → [..., O] float32, activations in float32.

    qweight uint8 [O, packed_row_bytes(I, bits)], scales and zeros fp16 [n_groups, O] (zeros None: 0)."""
    O, I = qweight.shape[0], x.shape[-1]
    if not lowbit_ok(bits, group_size, I) or scales.dtype != torch.float16 \
            or (zeros is not None and zeros.dtype != torch.float16):
        raise ValueError(f"no lowbit kernel for bits={bits}, group_size={group_size}, in_features={I}, "
                         f"scales {scales.dtype}")
    x2 = _rows(x, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    _native.lowbit(_ptr(x2), x2.shape[0], I, _ptr(qweight), qweight.shape[1], O, bits, _ptr(scales), _ptr(zeros),
                   group_size or 0, _ptr(bias), _ptr(y), _isa(isa), threads or get_num_threads())
    return _shaped(y, x)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                act: str = "f32", isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """x [..., I] float32 · (int8 codes [O, I] × float32 scales [O]) → [..., O] float32, weight-only."""
    O, I = qweight.shape
    x2 = _rows(x, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    _native.linear(_ptr(x2), x2.shape[0], I, _ptr(qweight), I, O, 8, 0, _ptr(scales), 0, 0, 0, _ptr(bias), _ptr(y),
                   ACTS[act], _isa(isa), threads or get_num_threads())
    return _shaped(y, x)


def linear_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: str | None = None,
                 threads: int | None = None) -> torch.Tensor:
    """x [..., I] float32 · weight float32 [O, I]ᵀ + bias → [..., O] float32 (F.linear up to summation order)."""
    O, I = weight.shape
    if weight.dtype is not torch.float32 or (bias is not None and bias.dtype is not torch.float32):
        raise ValueError(f"linear_float takes float32 weights; got {weight.dtype}")
    x2 = _rows(x, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    _native.linear_f32(_ptr(x2), x2.shape[0], I, _ptr(weight), O, _ptr(bias), _ptr(y), _isa(isa),
                       threads or get_num_threads())
    return _shaped(y, x)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                mode: str = "dynamic", in_scale: float = 0.0, in_zero: int = 0, isa: str | None = None,
                threads: int | None = None) -> torch.Tensor:
    """fbgemm's quantized linear on Int8WeightLinear storage (int8 [O, I], float32 scales [O]): x rounded to one
    uint8 grid 0..127 — chosen from the input's range ("dynamic"), from each row divided by its max |x|
    ("dynamic-per-token", as Int8DynamicLinear does for several rows) or given ("static": in_scale, in_zero) —,
    int32 dot products, y = fma(acc, x_scale·scale[o], bias[o])."""
    O, I = qweight.shape
    x2 = _rows(x, I)
    y = torch.empty(x2.shape[0], O, dtype=torch.float32)
    _native.w8a8(_ptr(x2), x2.shape[0], I, _ptr(qweight), O, _ptr(scales), _ptr(bias), _ptr(y), W8A8_MODES[mode],
                 float(in_scale), int(in_zero), _isa(isa), threads or get_num_threads())
    return _shaped(y, x)


FUSED_KINDS = {"packed": 0, "w8a8": 1, "float": 2, "lowbit": 3}  # linear layer kinds of the fused decode step (decode.cpp)


def fused_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int | None,
                 in_features: int, bias: torch.Tensor | None, act: str = "q8") -> tuple:
    """A fused-decode descriptor of a PackedLinear weight: bits 4 or 8 (linear_packed, activations `act`) or
    2 or 3 (linear_lowbit, float32 activations)."""
    O = qweight.shape[0]
    low = lowbit_ok(bits, group_size, in_features)
    if (not low and (bits not in (4, 8) or not group_ok(group_size, in_features))) or scales.dtype != torch.float16 \
            or zeros.dtype != torch.float16:
        raise ValueError(f"no native kernel for bits={bits}, group_size={group_size}, in_features={in_features}")
    return (FUSED_KINDS["lowbit" if low else "packed"], in_features, O, _ptr(qweight), qweight.shape[1], bits, 1, _ptr(scales),
            _ptr(zeros), 1, group_size or 0, _ptr(bias), ACTS[act], 0, 0.0, 0)


def fused_w8a8(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, mode: str = "dynamic",
               in_scale: float = 0.0, in_zero: int = 0) -> tuple:
    """A fused-decode descriptor of an Int8WeightLinear (linear_w8a8's storage and arithmetic; "dynamic" takes
    one grid for the token's row, "static" the given one)."""
    if mode not in ("dynamic", "static"):
        raise ValueError(f"the fused decode step takes w8a8 modes dynamic and static; got {mode!r}")
    O, I = qweight.shape
    return (FUSED_KINDS["w8a8"], I, O, _ptr(qweight), I, 8, 0, _ptr(scales), 0, 0, 0, _ptr(bias), ACTS["f32"],
            W8A8_MODES[mode], float(in_scale), int(in_zero))


def fused_float(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """A fused-decode descriptor of a float32 weight [O, I] (nn.Linear): y = W·x + b in float32."""
    if weight.dtype is not torch.float32 or (bias is not None and bias.dtype is not torch.float32):
        raise ValueError(f"the fused decode step takes float32 weights; got {weight.dtype}")
    O, I = weight.shape
    return (FUSED_KINDS["float"], I, O, _ptr(weight), 0, 0, 0, 0, 0, 0, 0, _ptr(bias), 0, 0, 0.0, 0)


def decode_plan(*, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float, embed: torch.Tensor,
                final_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, head: tuple, layers: list[tuple]):
    """The fused decode step's plan of a Llama-family model (an opaque capsule for decode_step).

    embed float32 [vocab, D]; final_norm [D]; cos, sin [max_len, Dh] (the rotate-half tables, sin signed, as
    NativeRunner builds them); k_cache, v_cache float32 [L, rows, KV, max_len, Dh] (row 0 is written and read);
    head: a fused_* descriptor; layers: per block (attn_norm [D], mlp_norm [D], q, k, v, o, gate, up, down) with
    fused_* descriptors. Every tensor must be contiguous and stay alive while the plan is used."""
    t = (embed, final_norm, cos, sin, k_cache, v_cache)
    if any(x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() for x in t):
        raise ValueError("the fused decode step needs contiguous float32 CPU tensors")
    D, max_len = embed.shape[1], cos.shape[0]
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (kv_heads, max_len, head_dim) \
            or cos.shape != sin.shape or cos.shape[1] != head_dim or final_norm.numel() != D:
        raise ValueError("the fused decode step's caches, tables and norm disagree with the model's dims")
    rows = [(_ptr(an), _ptr(mn), *lins) for an, mn, *lins in layers]
    if len(rows) != k_cache.shape[0] or any(an.numel() != D or mn.numel() != D for an, mn, *_ in layers):
        raise ValueError("the fused decode step's layers disagree with the caches or the model's width")
    return _native.decode_plan(D, heads, kv_heads, head_dim, embed.shape[0], max_len, eps, scale, _ptr(embed),
                               _ptr(final_norm), _ptr(cos), _ptr(sin), _ptr(k_cache), _ptr(v_cache),
                               k_cache.stride(0), k_cache.stride(2), head, rows)


def decode_step(plan, token: int, pos: int, logits: torch.Tensor, isa: str | None = None,
                threads: int | None = None) -> torch.Tensor:
    """One token at position pos through a decode_plan: its k/v written into row 0 of the caches at pos, its
    logits into `logits` (contiguous float32, at least the head's out_features elements), which is returned."""
    if logits.dtype is not torch.float32:
        raise ValueError(f"logits must be float32; got {logits.dtype}")
    _native.decode_step(plan, token, pos, _ptr(logits), _isa(isa), threads or get_num_threads())
    return logits


DECODE_PHASES = ("norm", "prepare", "qkv", "rope", "attn", "o", "gateup", "silu", "down", "head")


def decode_profile(plan, on: bool = True) -> dict[str, float]:
    """Seconds each phase of decode_step took (DECODE_PHASES: the serial norms/residuals, the serial preparation
    of quantized activations, each group of linears, RoPE + cache writes, attention, SiLU) since the last call,
    which resets them; `on` switches timing on or off for the steps that follow (one clock read per phase)."""
    return dict(zip(DECODE_PHASES, _native.decode_profile(plan, bool(on))))


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int | None, in_features: int, out: torch.Tensor | None = None,
                      isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """PackedLinear storage (qweight uint8 [O, packed_row_bytes(I, bits)], scales and zeros fp16 or float32
    [n_groups, O], zeros None for 0) → float32 weight [O, I], equal to quant.primitives.dequantize of the unpacked
    codes. out: a contiguous float32 buffer of at least O·I elements to write into (the result is a view of it)."""
    O, I = qweight.shape[0], in_features
    ng = -(-I // group_size) if group_size and group_size < I else 1
    from ..quant.primitives import packed_row_bytes
    if (qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != packed_row_bytes(I, bits)
            or scales.shape != (ng, O) or (zeros is not None and (zeros.shape != (ng, O) or zeros.dtype != scales.dtype))
            or scales.dtype not in (torch.float16, torch.float32)):
        raise ValueError(f"no packed {bits}-bit weight of {O}x{I} (group {group_size}): qweight {qweight.dtype} "
                         f"{list(qweight.shape)}, scales {scales.dtype} {list(scales.shape)}")
    if out is None:
        out = torch.empty(O * I, dtype=torch.float32)
    elif out.dtype is not torch.float32 or not out.is_contiguous() or out.numel() < O * I:
        raise ValueError(f"out must be a contiguous float32 buffer of at least {O * I} elements")
    _native.dequant(_ptr(qweight), qweight.shape[1], O, I, bits, _ptr(scales), _ptr(zeros),
                    int(scales.dtype is torch.float16), group_size or 0, _ptr(out), _isa(isa),
                    threads or get_num_threads())
    return out.view(-1)[:O * I].view(O, I)


_scratch = threading.local()


def scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least numel elements, this Python thread's own, reused from call to call (it grows
    to the largest size asked and stays: one layer's weight; release_scratch() frees it). Whatever was written
    there is overwritten by the next caller on the thread: use it only for a value consumed at once."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        _scratch.buf = buf = None  # free the old one before the new one is allocated
        _scratch.buf = buf = torch.empty(numel, dtype=torch.float32)
    return buf


def release_scratch() -> None:
    """Free this thread's scratch buffer (scratch())."""
    _scratch.buf = None
