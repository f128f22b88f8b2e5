"""Model runners: the forward pass behind generation, over a preallocated per-row KV cache.

A runner owns a KV cache of `max_batch` rows × `max_len` positions and answers two calls:

  prefill(ids [B, T], start, row)  append T tokens to rows row..row+B-1, all starting at position `start`;
                                   returns the logits of the last position [B, V] (or of all, [B, T, V])
  decode(ids [B], pos)             append one token to each of rows 0..B-1, row b at position pos[b]
                                   (an int when all rows share it); returns [B, V]

plus `move_row(src, dst, length)` (the scheduler keeps active rows packed at the front) and `reset()`.
Rolling back is free: a row's length is kept by the caller, and positions past it are simply overwritten
by the next call (speculative decoding relies on this).

NativeRunner is lmpress's own forward pass for the Llama family (Llama, Qwen2 — q/k/v biases —, Mistral
without a sliding window): RMSNorm, RoPE from the model's own rotary module (default, linear, llama3, yarn
scaling: every rope whose frequencies do not depend on the sequence length), GQA attention with
F.scaled_dot_product_attention, SwiGLU. Every projection runs the model's own module, so quantized lmpress
formats — and the native kernels behind them — run unchanged (their forward is called directly, without
nn.Module hooks; build the runner after compressing: it keeps references to the modules). The per-token
Python cost is a few dozen torch calls per layer; `benchmarks/runtime.py --overhead` measures it on a model so
small that the matmuls cost nothing.

The fused decode step. For one row on CPU float32 (decode of B = 1, the common case) NativeRunner instead runs
the whole token in one native call (lmpress.kernels.decode_plan / decode_step, csrc/decode.cpp): the same
RMSNorm, RoPE tables, KV caches and GQA attention, and every projection on the kernel its layer's own forward
takes, with the same activation arithmetic (PackedLinear int4/int8 "q8" or "f32", w8a8 dynamic and static,
float32 nn.Linear), so it computes the per-op path's numbers up to float summation order. The plan is built
at the first such call; a model with any other layer (int2/int3, sparse, unknown modules, fp16 weights) keeps
the per-op path, and so do B > 1 rows, LMPRESS_KERNELS=0, and `runner.fused = False` or LMPRESS_FUSED=0 (read
at import into FUSED) for benchmarks and tests. `fused_reason` says why a runner does not fuse. Like the per-op
path, the plan reads the layers' tensors as they were when it was built: build the runner after compressing.

HFRunner is the reference path for every other family: transformers' own forward with one DynamicCache
per row (rows decode one after another: correct, not fast).
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import BadInput, UnsupportedModel
from ..nn.int8_dynamic import Int8DynamicLinear
from ..nn.int8_static import Int8StaticLinear
from ..nn.packed import PackedLinear

NATIVE_FAMILIES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # frequencies fixed at load, not by sequence length
FUSED = os.environ.get("LMPRESS_FUSED", "1") != "0"   # the fused decode step by default (module docstring)


def default_max_len(lm, max_len: int | None) -> int:
    limit = lm.max_positions or 2048
    if max_len is None:
        return min(limit, 2048)
    if max_len < 2:
        raise BadInput(f"max_len must be at least 2, got {max_len}")
    return min(max_len, limit)


def check_fits(runner, rows: int, length: int) -> None:
    if rows > runner.max_batch:
        raise BadInput(f"{rows} rows exceed the runner's max_batch of {runner.max_batch}")
    if length > runner.max_len:
        raise BadInput(f"sequence of {length} tokens exceeds the context limit of {runner.max_len}")


def native_support(lm) -> str | None:
    """None when NativeRunner can run this model, else why not (one line)."""
    cfg = lm.config
    if cfg.model_type not in NATIVE_FAMILIES:
        return f"family '{cfg.model_type}' has no native forward (native: {', '.join(NATIVE_FAMILIES)})"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}).get("rope_type",
                                                                                                     "default")
    if rope not in STATIC_ROPE:
        return f"rope type '{rope}' is not supported natively"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers are not supported natively"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention is not supported natively"
    if _rotary(lm.model) is None:
        return "no rotary embedding module found"
    return None


def _rotary(model):
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "attention_scaling"):
            return mod
    return None


def _device_dtype(lm):
    w = lm.arch.get(lm.model, lm.arch.embed).weight
    return w.device, (w.dtype if w.dtype.is_floating_point else torch.float32)


def projection(mod: torch.nn.Module):
    """The callable the decode loop uses for a linear layer: _float_linear bound to a float nn.Linear's tensors,
    else the module's own forward (an lmpress format, with whatever kernel it picks). Both skip
    nn.Module.__call__'s hook machinery, a few µs per call that add up over 7 projections × every layer."""
    if type(mod) is torch.nn.Linear:
        if _cpu_f32(mod.weight, mod.bias):
            return partial(_float_linear, weight=mod.weight, bias=mod.bias)
        return partial(F.linear, weight=mod.weight, bias=mod.bias)
    return mod.forward


FLOAT_MAX_ROWS = 8  # at 16 rows torch's GEMM was faster (896→4864, 1 thread, busy machine: 3.5 vs 6.9 ms; ad-hoc timing)


def _float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or the native kernel for inputs of a few rows (kernels.linear_float: torch's GEMM costs about
    one GEMV per row there, which made verifying a speculative draft cost several decode steps)."""
    if x.numel() <= FLOAT_MAX_ROWS * x.shape[-1] and kernels.usable(x):
        return kernels.linear_float(x, weight, bias)
    return F.linear(x, weight, bias)


def _cpu_f32(*ts) -> bool:
    return all(t is None or (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()) for t in ts)


def fused_linear(mod: torch.nn.Module) -> tuple[tuple, list] | None:
    """(descriptor, tensors it points into) of a linear layer the fused decode step runs with its own forward's
    arithmetic, or None for any other layer (the runner then keeps the per-op path)."""
    t, b = type(mod), getattr(mod, "bias", None)
    if t is torch.nn.Linear and _cpu_f32(mod.weight, b):
        return kernels.fused_float(mod.weight, b), [mod.weight, b]
    if t is PackedLinear and mod._kernel_args()[0] is not None:  # a layer the GEMV kernels take
        act = "q8" if mod.native_act == "q8" else "f32"
        return (kernels.fused_packed(mod.qweight, mod.scales, mod.zeros, mod.bits, mod.group_size, mod.in_features,
                                     b, act), [mod.qweight, mod.scales, mod.zeros, b])
    if t in (Int8DynamicLinear, Int8StaticLinear) and mod.qweight.is_contiguous() and mod.qweight.is_cpu \
            and _cpu_f32(mod.scales, b):
        # one row: fbgemm's dynamic grid is that row's own, which linear_w8a8 "dynamic" computes bit for bit
        grid = ("dynamic",) if t is Int8DynamicLinear else ("static", *mod.input_qparams())
        return kernels.fused_w8a8(mod.qweight, mod.scales, b, *grid), [mod.qweight, mod.scales, b]
    return None


class _Layer:
    """One block's pieces, looked up once through the ArchSpec (plain attributes: no per-call lookups)."""

    __slots__ = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down", "mods")

    def __init__(self, spec, block):
        self.attn_norm = spec.get(block, spec.attn_norm).weight
        self.mlp_norm = spec.get(block, spec.mlp_norm).weight
        self.mods = tuple(spec.get(block, p) for p in (spec.q, spec.k, spec.v, spec.o, spec.gate, spec.up, spec.down))
        self.q, self.k, self.v, self.o, self.gate, self.up, self.down = (projection(m) for m in self.mods)


class NativeRunner:
    native = True
    fused = FUSED        # the fused decode step for one row when the model allows it (module docstring)
    fused_reason = None  # why not, once a decode found the model cannot take it
    _plan = None         # (capsule, tensors it points into, logits size) once built; False: the model cannot

    def __init__(self, lm, max_batch: int = 1, max_len: int | None = None):
        why = native_support(lm)
        if why:
            raise UnsupportedModel(why)
        cfg, spec, model = lm.config, lm.arch, lm.model
        self.device, self.dtype = _device_dtype(lm)
        self.max_batch, self.max_len = max_batch, default_max_len(lm, max_len)
        self.vocab_size = int(cfg.vocab_size)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.embed = spec.get(model, spec.embed)
        self.final_norm = spec.get(model, spec.final_norm).weight
        self._head = spec.get(model, spec.lm_head)
        self.lm_head = projection(self._head)
        self.layers = [_Layer(spec, b) for b in spec.block_list(model)]

        # RoPE tables [max_len, head_dim] in the rotate-half layout: out = x·cos + roll(x, half)·sin_signed,
        # where roll(x, half) = [x2, x1] and sin_signed = [−sin, sin] (= rotate_half(x)·sin)
        rot = _rotary(model)
        inv_freq = rot.inv_freq.detach().float().to(self.device)
        freqs = torch.arange(self.max_len, device=self.device, dtype=torch.float32)[:, None] * inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        s = float(rot.attention_scaling)
        self.cos = (emb.cos() * s).to(self.dtype)
        sin = (emb.sin() * s).to(self.dtype)
        half = self.head_dim // 2
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.half = half

        shape = (len(self.layers), max_batch, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._kc, self._vc = list(self.k_cache), list(self.v_cache)  # per-layer views, made once
        # roll(x, half) = x·P with P[i, j] = 1 where i = (j + half) mod Dh
        j = torch.arange(self.head_dim, device=self.device)
        self._roll = torch.zeros(self.head_dim, self.head_dim, device=self.device, dtype=self.dtype)
        self._roll[(j + half) % self.head_dim, j] = 1
        self._eps = torch.tensor(self.eps, device=self.device)
        self._key_pos = torch.arange(self.max_len, device=self.device)

    # ---- public calls ----------------------------------------------------------------------------------

    def reset(self) -> None:
        pass  # positions past a row's length are never read, so there is nothing to clear

    def move_row(self, src: int, dst: int, length: int) -> None:
        if src != dst:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, start: int = 0, row: int = 0, all_logits: bool = False) -> torch.Tensor:
        with kernels.torch_on_one_thread(self._few_rows(ids.numel())):
            return self._prefill(ids, start, row, all_logits)

    def _prefill(self, ids: torch.Tensor, start: int, row: int, all_logits: bool) -> torch.Tensor:
        B, T = ids.shape
        self._check(row + B, start + T)
        pos = slice(start, start + T)
        cos, sin = self.cos[pos][None, :, None], self.sin[pos][None, :, None]  # [1, T, 1, Dh]
        mask = None
        if start > 0 and T > 1:  # causal, shifted by the cached prefix: query t sees keys ≤ start + t
            mask = self._key_pos[None, :start + T] <= self._key_pos[start:start + T, None]  # [T, S]
        x = self.embed(ids.to(self.device))  # [B, T, D]
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x, cos, sin)  # q [B, T, H, Dh], k/v [B, T, KV, Dh]
            kc, vc = self.k_cache[i, row:row + B], self.v_cache[i, row:row + B]  # [B, KV, max_len, Dh]
            kc[:, :, pos] = k.transpose(1, 2)
            vc[:, :, pos] = v.transpose(1, 2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :start + T], vc[:, :, :start + T],
                                               attn_mask=mask, is_causal=T > 1 and mask is None,
                                               scale=self.scale, enable_gqa=self.group > 1)  # [B, H, T, Dh]
            x = self._mlp(L, x + L.o(a.transpose(1, 2).reshape(B, T, -1)))
        if not all_logits:
            x = x[:, -1]
        return self.lm_head(self._norm(x, self.final_norm)).float()

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, pos, out: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B] (rows 0..B-1), pos an int (all rows) or a sequence/tensor of B positions → logits [B, V].
        out: the logits an earlier decode returned, to be written again (the fused step does, and returns it;
        its contents are lost): a fresh 200 KB tensor per token costs ~50 µs of page faults."""
        B = ids.shape[0]
        if B == 1 and self.fused and kernels.ENABLED and (self._plan or self._plan is None and self._build_plan()):
            p = pos if isinstance(pos, int) else int(torch.as_tensor(pos).reshape(-1)[0])
            return self._decode_fused(int(ids[0]), p, out)
        with kernels.torch_on_one_thread(self._few_rows(B)):
            return self._decode_ops(ids, pos)

    def _few_rows(self, rows: int) -> bool:
        """Whether a pass of `rows` rows is one whose heavy work the native kernels carry (float layers up to
        FLOAT_MAX_ROWS rows, kernels.linear_float): torch's own ops then run on one thread."""
        return rows <= FLOAT_MAX_ROWS and self.device.type == "cpu"

    def _decode_ops(self, ids: torch.Tensor, pos) -> torch.Tensor:
        """The per-op decode step (any batch; the fused step's reference)."""
        B = ids.shape[0]
        H, KV, G, Dh = self.n_heads, self.n_kv, self.group, self.head_dim
        if isinstance(pos, int):
            p = torch.tensor([pos], device=self.device)
            length, mask, write = pos + 1, None, None
        else:
            p = torch.as_tensor(pos, device=self.device, dtype=torch.long)  # [B]
            length = int(p.max()) + 1
            mask = (self._key_pos[None, :length] <= p[:, None])[:, None, None]  # [B, 1, 1, S]
            write = p.view(B, 1, 1, 1).expand(B, KV, 1, Dh)  # scatter index: row b writes at p[b]
        check_fits(self, B, length)
        rope = self._rope_matrices(p)  # [1 or B, Dh, Dh]
        if rope.shape[0] != B:
            rope = rope.expand(B, Dh, Dh)
        x = self.embed(ids.to(self.device))  # [B, D]: 2-D all the way, no reshapes around the matmuls
        for i, L in enumerate(self.layers):
            h = self._norm(x, L.attn_norm)
            q = torch.bmm(L.q(h).view(B, H, Dh), rope)  # RoPE as one small matmul per projection
            k = torch.bmm(L.k(h).view(B, KV, Dh), rope).view(B, KV, 1, Dh)
            v = L.v(h).view(B, KV, 1, Dh)
            kc, vc = self._kc[i], self._vc[i]  # [max_batch, KV, max_len, Dh]
            if B != self.max_batch:
                kc, vc = kc[:B], vc[:B]
            if write is None:
                kc.index_copy_(2, p, k)
                vc.index_copy_(2, p, v)
            else:
                kc.scatter_(2, write, k)
                vc.scatter_(2, write, v)
            # the G query heads of a kv head act as G queries of one head: no repeated keys
            a = F.scaled_dot_product_attention(q.view(B, KV, G, Dh), kc.narrow(2, 0, length),
                                               vc.narrow(2, 0, length), attn_mask=mask, scale=self.scale)
            x = x + L.o(a.view(B, H * Dh))
            h = self._norm(x, L.mlp_norm)
            x = x + L.down(F.silu(L.gate(h)) * L.up(h))
        return self.lm_head(self._norm(x, self.final_norm)).float()

    def _decode_fused(self, token: int, pos: int, out: torch.Tensor | None = None) -> torch.Tensor:
        check_fits(self, 1, pos + 1)
        plan, _, V = self._plan
        if out is None or out.shape != (1, V) or out.dtype != torch.float32 or not out.is_contiguous() \
                or out.device.type != "cpu":
            out = torch.empty(1, V)
        return kernels.decode_step(plan, token, pos, out)

    def _build_plan(self) -> bool:
        """Register the model with the fused decode step (self._plan), or say why it cannot (fused_reason)."""
        self._plan = False
        if self.device.type != "cpu" or self.dtype is not torch.float32:
            self.fused_reason = f"the fused decode step runs float32 on the CPU, not {self.dtype} on {self.device}"
            return False
        mods = [self._head] + [m for L in self.layers for m in L.mods]
        descs = [fused_linear(m) for m in mods]
        embed = getattr(self.embed, "weight", None)
        norms = [self.final_norm] + [w for L in self.layers for w in (L.attn_norm, L.mlp_norm)]
        if not kernels.available():
            self.fused_reason = "the native kernels are not available"
        elif type(self.embed) is not torch.nn.Embedding or not _cpu_f32(embed, *norms):
            self.fused_reason = "the embedding or a norm is not a plain float32 tensor"
        elif None in descs:
            bad = mods[descs.index(None)]
            self.fused_reason = f"no fused kernel for {type(bad).__name__} layers ({bad.extra_repr()})"
        if self.fused_reason:
            return False
        head, *blocks = (d[0] for d in descs)
        layers = [(L.attn_norm, L.mlp_norm, *blocks[7 * i:7 * i + 7]) for i, L in enumerate(self.layers)]
        plan = kernels.decode_plan(heads=self.n_heads, kv_heads=self.n_kv, head_dim=self.head_dim, eps=self.eps,
                                   scale=self.scale, embed=embed, final_norm=self.final_norm, cos=self.cos,
                                   sin=self.sin, k_cache=self.k_cache, v_cache=self.v_cache, head=head,
                                   layers=layers)
        keep = [embed, self.cos, self.sin, self.k_cache, self.v_cache, *norms, *(t for d in descs for t in d[1])]
        self._plan = (plan, keep, head[2])  # head[2]: its out_features, the logits' size
        return True

    def _rope_matrices(self, p: torch.Tensor) -> torch.Tensor:
        """[len(p), Dh, Dh] matrices R with x·R = x·cos + roll(x, half)·sin_signed at each position of p."""
        return torch.diag_embed(self.cos[p]) + self._roll * self.sin[p][:, None, :]

    # ---- pieces ----------------------------------------------------------------------------------------

    def _check(self, rows: int, length: int) -> None:
        check_fits(self, rows, length)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # RMSNorm in float32, as transformers computes it; mean(x²) as |x|²/D: vector_norm is one cheap op
        xf = x.float()
        n = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        r = torch.rsqrt(torch.addcmul(self._eps, n, n, value=1 / x.shape[-1]))
        return w * (xf * r).to(x.dtype)

    def _qkv(self, L: _Layer, x, cos, sin):
        B, T, _ = x.shape
        h = self._norm(x, L.attn_norm)
        q = L.q(h).view(B, T, -1, self.head_dim)
        k = L.k(h).view(B, T, -1, self.head_dim)
        v = L.v(h).view(B, T, -1, self.head_dim)
        q = torch.addcmul(q * cos, q.roll(self.half, -1), sin)
        k = torch.addcmul(k * cos, k.roll(self.half, -1), sin)
        return q, k, v

    def _mlp(self, L: _Layer, x):
        h = self._norm(x, L.mlp_norm)
        return x + L.down(F.silu(L.gate(h)) * L.up(h))


class HFRunner:
    """transformers' forward over the same modules, one DynamicCache per row (the reference path)."""

    native = False

    def __init__(self, lm, max_batch: int = 1, max_len: int | None = None):
        self.model = lm.model
        self.max_batch, self.max_len = max_batch, default_max_len(lm, max_len)
        self.vocab_size = int(lm.config.vocab_size)
        self.device = next(lm.model.parameters()).device
        self.caches: list = [None] * max_batch

    def reset(self) -> None:
        self.caches = [None] * self.max_batch

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.caches[dst] = self.caches[src]
        if src != dst:
            self.caches[src] = None

    def _cache(self, row: int, start: int):
        from transformers import DynamicCache

        c = self.caches[row]
        if start == 0 or c is None:
            if start != 0:
                raise BadInput("HFRunner: a row must start at position 0")
            c = self.caches[row] = DynamicCache(config=self.model.config)
        elif c.get_seq_length() > start:
            c.crop(start)
        return c

    def _check(self, rows: int, length: int) -> None:
        check_fits(self, rows, length)

    @torch.inference_mode()
    def _step(self, row: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        cache = self._cache(row, start)
        return self.model(input_ids=ids.view(1, -1).to(self.device), cache=cache,
                          use_cache=True).logits[0].float()  # [T, V]

    def prefill(self, ids: torch.Tensor, start: int = 0, row: int = 0, all_logits: bool = False) -> torch.Tensor:
        B, T = ids.shape
        self._check(row + B, start + T)
        out = torch.stack([self._step(row + b, ids[b], start) for b in range(B)])  # [B, T, V]
        return out if all_logits else out[:, -1]

    def decode(self, ids: torch.Tensor, pos, out: torch.Tensor | None = None) -> torch.Tensor:
        """As NativeRunner.decode; `out` is not used (the logits are always a new tensor)."""
        B = ids.shape[0]
        pos = [pos] * B if isinstance(pos, int) else [int(p) for p in pos]
        self._check(B, max(pos) + 1)
        return torch.stack([self._step(b, ids[b:b + 1], pos[b])[-1] for b in range(B)])


def make_runner(lm, max_batch: int = 1, max_len: int | None = None, backend: str = "auto"):
    """NativeRunner when the family is supported (backend "auto" or "native"), else HFRunner.
    Returns (runner, notice): notice says why the reference path was taken (None when native)."""
    if backend not in ("auto", "native", "transformers"):
        raise BadInput(f"unknown engine backend '{backend}' (auto, native, transformers)")
    if backend == "transformers":
        return HFRunner(lm, max_batch, max_len), None
    why = native_support(lm)
    if why is None:
        return NativeRunner(lm, max_batch, max_len), None
    if backend == "native":
        raise UnsupportedModel(why)
    return HFRunner(lm, max_batch, max_len), f"{why}: using the transformers forward (slower)"
