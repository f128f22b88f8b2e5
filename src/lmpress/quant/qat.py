"""Quantization-aware training (QAT): fine-tune a model through fake-quantized weights, then store the codes.

    model = prepare_qat(model, bits=3, group_size=32)          float linears -> FakeQuantLinear
    history = train_qat(model, teacher, batches, steps=200, lr=1e-4)
    model = convert_qat(model)                                 FakeQuantLinear -> PackedLinear (exact)

or, in one call from a recipe step, `qat(lm, QAT(bits=3, group_size=32, ...))`.

The grid is RTN's: asymmetric min-max per group of `group_size` input columns by default (symmetric=True for
the "uniform" grid), a partial last group padded with zero columns (nn.packed.pad_to_groups), scales and
zero-points rounded to fp16 — the precision PackedLinear stores — *during* training, so that conversion
stores exactly the codes and parameters the last forward pass used: the converted model's logits equal the
QAT model's.

Two ways of choosing the grid while training:

- learn_scale=False (default): each forward recomputes the min-max parameters of the current float weight
  (no gradient through min/max) and rounds with a straight-through estimator (STE): the forward uses the
  fake-quantized weight, the backward passes the gradient to the float weight unchanged. At step 0 this is
  exactly RTN.
- learn_scale=True (LSQ, Esser et al. 2020): the per-group scale is a parameter, initialised from min-max;
  rounding is STE, clamping is not (a weight outside the grid gets no gradient; the scale gets it, so the
  range learns to clip), and the scale's gradient is multiplied by 1/sqrt(group numel · qmax) with
  qmax = 2^b − 1 (2^(b−1) − 1 symmetric) so its step is commensurate with the weights'. Zero-points stay
  fixed at their initial integer value: a learnable zero-point would need its own STE on rounding and drifts
  with the scale; fixing it keeps the grid's anchor where min-max put it and the stored format unchanged.

What trains: the weights, biases (and learnable scales) of the FakeQuantLinear layers. Embeddings, norms,
the output head left in float and every other parameter are frozen: the float teacher's copy of them is what
the student is distilled against, and a frozen head keeps the output space shared. The student runs in eval
mode (no dropout): this is a short fine-tune towards the teacher, not regularised pretraining.

Losses on a batch of token ids [B, T]: "ce" next-token cross-entropy on the data, "kl" KL(teacher ‖ student)
of the next-token distributions at temperature τ (times τ², Hinton et al.), averaged over all positions, and
"kl+ce" their sum. Training data: windows of a text (calibration_windows) or, with data="self", sequences
sampled from the float model itself from BOS (data-free self-distillation, LLM-QAT, Liu et al. 2023) —
in-distribution for any model, no text or tokenizer needed.
"""

from __future__ import annotations

import copy
import math
import re
import time
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BadInput
from ..nn import linear_weight
from ..nn.packed import PackedLinear, pad_to_groups
from .primitives import TINY_SCALE, QParams, check_bits, compute_qparams, dequantize, quantize
from .rtn import storage_qparams

DEFAULT_IGNORE = r"(^|\.)lm_head$"
OPTIMIZERS = ("adamw", "sgd")
LOSSES = ("kl", "ce", "kl+ce")


def _check_group_size(group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, Integral)
                                   or group_size < 1):
        raise BadInput(f"group_size must be a positive integer or None (per output channel); got {group_size!r}")


def _ste(x: Tensor, value: Tensor) -> Tensor:
    """`value` in the forward pass, the gradient of `x` in the backward one. Written value + (x − x.detach())
    rather than x + (value − x).detach(): the forward is then exactly `value` (+ 0), not a rounding of it,
    which is what makes conversion to stored codes bit-exact."""
    return value.detach() + (x - x.detach())


class FakeQuantLinear(torch.nn.Module):
    """A linear layer computing with its fake-quantized weight; trainable through a straight-through estimator.

    weight: [O, I] float32 parameter (GPT-2's Conv1D is stored transposed into this layout), bias: [O] or None.
    learn_scale: scale [O, G] parameter, zero [O, G] buffer (G = ceil(I / group_size), 1 per channel).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, group_size: int | None,
                 symmetric: bool = False, learn_scale: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        _check_group_size(group_size)
        self.group_size, self.symmetric, self.learn_scale = group_size, symmetric, learn_scale
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight.detach().float().clone())  # [O, I]
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone())  # [O]
        if learn_scale:
            qp = self._minmax_qparams()
            self.scale = torch.nn.Parameter(qp.scale.clone())  # [O, G], fp16-representable at init
            self.register_buffer("zero", qp.zero.clone())  # [O, G] integer-valued, fixed
            g = self.in_features if group_size is None else group_size  # weights per scale (padding included)
            qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
            self.grad_scale = 1.0 / math.sqrt(g * qmax)
        else:
            self.scale, self.zero = None, None

    @classmethod
    def from_linear(cls, mod: torch.nn.Module, bits: int, group_size: int | None, symmetric: bool = False,
                    learn_scale: bool = False) -> FakeQuantLinear:
        return cls(linear_weight(mod), getattr(mod, "bias", None), bits, group_size, symmetric, learn_scale)

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size) if self.group_size else 1

    def _padded_weight(self) -> Tensor:
        return pad_to_groups(self.weight, self.group_size)  # [O, G·g], zero columns appended

    def _minmax_qparams(self) -> QParams:
        w = self._padded_weight().detach()
        return storage_qparams(compute_qparams(w, self.bits, self.group_size, symmetric=self.symmetric))

    def qparams(self) -> QParams:
        """The grid the next forward pass uses (detached, fp16-representable scale and zero [O, G])."""
        if not self.learn_scale:
            return self._minmax_qparams()
        scale = self.scale.detach().clamp_min(TINY_SCALE).half().float()
        return QParams(scale, self.zero.clone(), self.bits, self.group_size, self.symmetric)

    def codes(self) -> Tensor:
        """uint8 codes [O, I] of the current weight on the current grid (the real columns only)."""
        with torch.no_grad():
            return quantize(self._padded_weight().detach(), self.qparams())[:, :self.in_features]

    def fake_weight(self) -> Tensor:
        """The weight [O, I] the layer computes with: (code − zero) · scale, differentiable by STE."""
        w = self._padded_weight()  # [O, Ip]
        O, Ip = w.shape
        if not self.learn_scale:
            qp = self._minmax_qparams()
            wq = dequantize(quantize(w.detach(), qp), qp)  # exactly PackedLinear.dequantize's arithmetic
            return _ste(w, wq)[:, :self.in_features]
        qlo, qhi = (1 if self.symmetric else 0), 2**self.bits - 1
        s = self.scale.clamp_min(TINY_SCALE)  # [O, G]
        sg = s * self.grad_scale
        s = _ste(sg, s.detach().half().float())  # forward: the fp16 scale; backward: LSQ-scaled gradient
        s, z = s[..., None], self.zero[..., None]  # [O, G, 1]
        x = w.reshape(O, -1, Ip // s.shape[1]) / s  # [O, G, g]
        codes = torch.clamp(_ste(x, torch.round(x)) + z, qlo, qhi)  # STE on round; clamp cuts the gradient
        return ((codes - z) * s).reshape(O, Ip)[:, :self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., I] -> [..., O]
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_packed(self) -> PackedLinear:
        """The stored form: exactly the codes and fp16 parameters the forward pass uses."""
        qp = self.qparams()
        return PackedLinear.from_codes(self.codes(), qp, self.bias, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"{'sym' if self.symmetric else 'asym'}{', learn_scale' if self.learn_scale else ''}")


# ------------------------------------------------------------------------------------------------ prepare

def _float_linears(model: torch.nn.Module, targets: str | None, ignore: str | None) -> dict[str, torch.nn.Module]:
    """The float linear layers compress.linear_layers finds (a shared module once, under its first name),
    filtered by the two regexes (re.search) as compress.select does."""
    from ..compress import linear_layers  # one definition of "a float linear layer"; imported late: no cycle

    for value, field in ((targets, "targets"), (ignore, "ignore")):
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise BadInput(f"{field}: invalid regular expression {value!r} ({e})") from None
    out = {name: mod for name, mod in linear_layers(model).items()
           if (targets is None or re.search(targets, name)) and (ignore is None or not re.search(ignore, name))}
    if not out:
        raise BadInput(f"QAT: targets={targets!r} ignore={ignore!r} match no float linear layer of this "
                       f"{type(model).__name__}")
    return out


def _swap(model: torch.nn.Module, new: dict[int, torch.nn.Module]) -> None:
    """Replace every occurrence of the modules keyed by id (a layer shared under several names stays shared)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])


def prepare_qat(model: torch.nn.Module, bits: int, group_size: int | None, symmetric: bool = False,
                learn_scale: bool = False, targets: str | None = None,
                ignore: str | None = DEFAULT_IGNORE) -> torch.nn.Module:
    """Replace the selected float linear layers of `model` by FakeQuantLinear, in place; returns `model`."""
    check_bits(bits)
    _check_group_size(group_size)
    layers = _float_linears(model, targets, ignore)
    _swap(model, {id(m): FakeQuantLinear.from_linear(m, bits, group_size, symmetric, learn_scale)
                  for m in layers.values()})
    return model


def fake_quant_layers(model: torch.nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


# ------------------------------------------------------------------------------------------------ train

def _logits(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """ids: [B, T] -> logits [B, T, V] float32 (a transformers causal LM, or any module returning logits)."""
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return getattr(out, "logits", out).float()


def qat_loss(student_logits: Tensor, teacher_logits: Tensor | None, ids: Tensor, loss: str,
             temperature: float = 1.0) -> Tensor:
    """student/teacher logits: [B, T, V], ids: [B, T]. Mean over positions (CE: the T − 1 predicted ones)."""
    total = student_logits.new_zeros(())
    if "kl" in loss:
        t = temperature
        log_p = F.log_softmax(teacher_logits / t, dim=-1)  # [B, T, V]
        log_q = F.log_softmax(student_logits / t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, T]: KL(teacher ‖ student) per position
        total = total + kl.mean() * t * t
    if "ce" in loss:
        V = student_logits.shape[-1]
        total = total + F.cross_entropy(student_logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return total


def _check_hparams(steps, lr, optimizer, loss, temperature=1.0, weight_decay=0.0) -> None:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise BadInput(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise BadInput(f"lr must be a positive number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"unknown optimizer '{optimizer}' (choose from {', '.join(OPTIMIZERS)})")
    if loss not in LOSSES:
        raise BadInput(f"unknown loss '{loss}' (choose from {', '.join(LOSSES)})")
    if not temperature > 0:
        raise BadInput(f"temperature must be positive, got {temperature!r}")
    if not weight_decay >= 0:
        raise BadInput(f"weight_decay must be >= 0, got {weight_decay!r}")


def _check_batches(batches) -> None:
    if not batches:
        raise BadInput("QAT needs at least one batch of token ids")
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] < 2 or b.is_floating_point():
            raise BadInput(f"each batch must be integer token ids [B, T] with T >= 2; got "
                           f"{getattr(b, 'dtype', type(b))} {tuple(getattr(b, 'shape', ()))}")


def train_qat(model: torch.nn.Module, teacher: torch.nn.Module | None, batches: list[Tensor], steps: int,
              lr: float, optimizer: str = "adamw", loss: str = "kl", temperature: float = 1.0,
              weight_decay: float = 0.0, progress: bool = False, seed: int = 0) -> dict:
    """Fine-tune the FakeQuantLinear layers of `model` (in place) for `steps` steps; returns the loss history.

    batches: token ids [B, T] each, visited in a seeded random order, reshuffled every pass. teacher: the float
    model (needed by "kl"; run in eval mode without gradients). AdamW (β 0.9/0.999) or SGD (momentum 0.9), a
    cosine decay of lr to 0 over `steps`, gradients clipped to norm 1. Deterministic for a given seed on a
    given machine. Keys: loss (per step), first, last, steps, seconds, trained_params."""
    _check_hparams(steps, lr, optimizer, loss, temperature, weight_decay)
    _check_batches(batches)
    if "kl" in loss and teacher is None:
        raise BadInput(f"loss '{loss}' needs the float teacher model")
    layers = fake_quant_layers(model)
    if not layers:
        raise BadInput("the model has no FakeQuantLinear layer: call prepare_qat first")
    params = [p for m in layers.values() for p in (m.weight, m.bias, m.scale) if p is not None]
    trainable = {id(p) for p in params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    history: list[float] = []
    order: list[int] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=steps, desc="QAT", unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        with torch.enable_grad():  # compress() calls steps under no_grad
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                ids = batches[order.pop()]
                t_logits = None
                if teacher is not None and "kl" in loss:
                    with torch.no_grad():
                        t_logits = _logits(teacher, ids)
                value = qat_loss(_logits(model, ids), t_logits, ids, loss, temperature)
                opt.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                history.append(float(value.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {"loss": history, "first": history[0], "last": history[-1], "steps": steps,
            "seconds": time.perf_counter() - t0, "trained_params": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------------ convert

def convert_qat(model: torch.nn.Module) -> torch.nn.Module:
    """Every FakeQuantLinear becomes the PackedLinear holding its current codes and fp16 scale/zero (in place;
    returns `model`, or the PackedLinear when `model` itself is a FakeQuantLinear)."""
    if isinstance(model, FakeQuantLinear):
        return model.to_packed()
    with torch.no_grad():
        _swap(model, {id(m): m.to_packed() for m in fake_quant_layers(model).values()})
    return model


# ------------------------------------------------------------------------------------------------ data

@torch.no_grad()
def sample_batches(model: torch.nn.Module, n: int, length: int, batch_size: int, bos: int, seed: int = 0,
                   temperature: float = 1.0) -> list[Tensor]:
    """Data-free training data: n sequences of `length` tokens sampled from `model` starting at BOS, with a
    seeded generator, cut into batches [batch_size, length] (the last may be smaller). Uses the KV cache of a
    transformers causal LM."""
    from transformers import DynamicCache

    if n < 1 or length < 2 or batch_size < 1:
        raise BadInput(f"sampling needs n >= 1, length >= 2, batch_size >= 1; got {n}, {length}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            ids = torch.full((b, 1), bos, dtype=torch.long)  # [b, t]
            cache, step_in = DynamicCache(config=model.config), ids
            while ids.shape[1] < length:
                logits = model(input_ids=step_in, cache=cache, use_cache=True).logits  # [b, 1, V]
                probs = F.softmax(logits[:, -1].float() / temperature, dim=-1)  # [b, V]
                nxt = torch.multinomial(probs, 1, generator=gen)  # [b, 1]
                ids = torch.cat([ids, nxt], dim=1)
                step_in = nxt
            out.append(ids)
    finally:
        model.train(was_training)
    return out


def text_batches(ids: Tensor, n: int, length: int, batch_size: int, seed: int = 0,
                 bos: int | None = None) -> list[Tensor]:
    """n seeded, non-overlapping windows of `length` tokens of a text's ids [N] (BOS prepended when given, so
    a window starts as the model's inputs do), cut into batches [batch_size, length]."""
    from ..data import calibration_windows

    body = length - 1 if bos is not None else length
    wins = calibration_windows(ids, n, body, seed)
    rows = [w.ids if bos is None else torch.cat([torch.tensor([bos]), w.ids]) for w in wins]
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# ------------------------------------------------------------------------------------------------ one call

def qat(lm_or_model, step, text_ids: Tensor | None = None, tokenizer=None, progress: bool = False):
    """Apply a QAT recipe step: teacher = a deep copy of the model as it is now, prepare, draw training data,
    train, convert. `step` has the fields of recipe.QAT (bits, group_size, symmetric, learn_scale, steps, lr,
    batch_size, seq_len, n_samples, optimizer, loss, data, seed, targets, ignore).

    Data: `text_ids` [N] when given; else step.data == "self" samples the float model (no tokenizer needed);
    else the text load_text(step.data) tokenized with `tokenizer` (or lm_or_model.tokenizer). Returns the
    compressed model (for a LoadedModel its .model is replaced in place and the LoadedModel returned)."""
    # a LoadedModel holds the module in .model; a module is used as is (a transformers LM's .model is its body)
    model = lm_or_model if isinstance(lm_or_model, torch.nn.Module) else lm_or_model.model
    tokenizer = tokenizer or getattr(lm_or_model, "tokenizer", None)
    check_bits(step.bits)
    _check_group_size(step.group_size)
    _check_hparams(step.steps, step.lr, step.optimizer, step.loss)
    for field in ("batch_size", "seq_len", "n_samples"):
        value = getattr(step, field)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < (2 if field == "seq_len" else 1):
            raise BadInput(f"QAT {field} must be an integer >= {2 if field == 'seq_len' else 1}, got {value!r}")
    bos = next((v for v in (getattr(tokenizer, "bos_token_id", None),
                            getattr(getattr(model, "config", None), "bos_token_id", None)) if isinstance(v, int)), None)
    n = step.n_samples

    _float_linears(model, step.targets, step.ignore)  # a clear error before any work
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if text_ids is None and step.data == "self":
        if bos is None:
            raise BadInput("QAT data='self' samples from BOS, but the model has no bos_token_id: give a text")
        batches = sample_batches(teacher, n, step.seq_len, step.batch_size, bos, step.seed)
    else:
        if text_ids is None:
            if tokenizer is None:
                raise BadInput(f"QAT data '{step.data}' is text: it needs the model's tokenizer (or use data='self')")
            from ..data import load_text, tokenize

            text_ids = tokenize(tokenizer, load_text(step.data))
        batches = text_batches(text_ids, n, step.seq_len, step.batch_size, step.seed, bos)

    prepare_qat(model, step.bits, step.group_size, step.symmetric, step.learn_scale, step.targets, step.ignore)
    try:
        train_qat(model, teacher, batches, step.steps, step.lr, step.optimizer, step.loss, progress=progress,
                  seed=step.seed)
    finally:
        convert_qat(model)  # never leave training modules behind, even when interrupted
    del teacher
    return lm_or_model
