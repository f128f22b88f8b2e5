"""Activation observers: the static activation grid of a layer, chosen from calibration data.

An observer sees a layer's input activations x: [..., I], batch after batch, and answers ONE (scale, zero)
for the whole tensor (per tensor, not per token or channel): what `nn.int8_static.Int8StaticLinear` stores
and quantizes its inputs with at run time, x ≈ (code − zero) · scale.

The grid is the kernel's: asymmetric uint8 with codes 0..127 (reduce_range, 7 bits), the grid of fbgemm's
u8·s8 int8 linear that the static module runs on. Asymmetric because a layer's inputs are often lopsided
(after SiLU·up the minimum is about −0.28 while the maximum is large), and uint8 because that is what the
kernel takes; 0..127 rather than 0..255 for the reason given in nn/int8_dynamic.py (AVX2 CPUs without VNNI
can saturate the kernel's int16 pair sums with 8-bit activations, and a saved model must compute the same
everywhere). A range [lo, hi] becomes (scale, zero) through `kernel_qparams` (ATen's ChooseQuantizationParams,
shared with the dynamic module): the range is widened to include 0, so 0 is exact and 0 ≤ zero ≤ 127.

Observers (each: `update(x)`, `range() -> (lo, hi)`, `qparams() -> (scale, zero)`):
  MinMaxObserver       the running minimum and maximum. Exact, and any outlier widens the grid for everyone.
  PercentileObserver   for each batch, the (100 − p)-th and p-th percentiles of x (both tails of x, not of |x|:
                       the two ends are clipped separately, as the grid is asymmetric), computed exactly with
                       torch.quantile's linear interpolation (via topk on the tails, so no size limit and no
                       full sort); batches are combined by the mean of their percentiles weighted by their
                       element counts. Memory: three numbers. The estimate is that of the per-batch
                       distribution: with batches of a few thousand values or less, p = 99.99 is about the
                       batch maximum; feed batches of many tokens (a [B, T] window batch gives B·T·I values).
  MSEObserver          a fixed-size uniform random sample of all values seen (bottom-k of random keys: a
                       reservoir sample, 65536 values by default, seeded) plus the exact running min/max; at
                       the end, the shrink factor f of the min-max range ([lo·f, hi·f], f from 1 down to 0.01)
                       whose grid gives the lowest mean squared quantization error on the sample, clipping
                       included. f = 1 (min-max) is tried first and kept on ties, so on the sample it is never
                       worse than min-max.

`calibrate_activations(model, layers, batches, observer=...)` observes the inputs of the named layers through
forward pre-hooks while the model runs the calibration batches (float model, eval mode, inference_mode), and
returns {name: (scale, zero)}. Hooks are always removed and train/eval flags restored, even on error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..errors import BadInput
from ..nn.int8_dynamic import kernel_qparams
from ..nn.int8_static import ACT_QMAX, ACT_QMIN, quantize_input


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero) of the kernel's uint8 0..127 grid covering [lo, hi] (widened to include 0)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadInput(f"activation range [{lo}, {hi}] is not finite: the float model overflows on the "
                       f"calibration data (inf or NaN activations)")
    return kernel_qparams(lo, hi, reduce_range=True)


def fake_quantize_act(x: Tensor, scale: float, zero: int) -> Tensor:
    """x quantized to the static grid and back, saturating outside it (float32; the kernel's rounding)."""
    return (quantize_input(x, scale, zero) - zero) * torch.tensor(scale, dtype=torch.float32)


def _flat(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise BadInput(f"an activation observer expects float tensors; got {type(x).__name__} "
                       f"{getattr(x, 'dtype', '')}")
    return x.detach().reshape(-1).float()


def _finite_minmax(flat: Tensor) -> tuple[float, float]:
    lo, hi = (float(v) for v in torch.aminmax(flat))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadInput("activations contain inf or NaN: the float model overflows on the calibration data")
    return lo, hi


class MinMaxObserver:
    """The running minimum and maximum of everything seen."""

    def __init__(self):
        self.lo, self.hi, self.count = math.inf, -math.inf, 0

    def update(self, x: Tensor) -> None:
        flat = _flat(x)
        if flat.numel():
            lo, hi = _finite_minmax(flat)
            self.lo, self.hi, self.count = min(self.lo, lo), max(self.hi, hi), self.count + flat.numel()

    def range(self) -> tuple[float, float]:
        _check_seen(self)
        return self.lo, self.hi

    def qparams(self) -> tuple[float, int]:
        return act_qparams(*self.range())


def _quantile_tail(flat: Tensor, q: float) -> float:
    """torch.quantile(flat, q) (linear interpolation), reading only the tail it needs through topk."""
    n = flat.numel()
    pos = q * (n - 1)
    i = min(int(math.floor(pos)), n - 1)
    frac = pos - i
    if q >= 0.5:  # the largest n − i values, descending: v[i] = top[n−1−i], v[i+1] = top[n−2−i]
        top = flat.topk(n - i).values
        a, b = top[n - 1 - i], top[max(n - 2 - i, 0)]
    else:  # the smallest i + 2 values, ascending
        bot = flat.topk(min(i + 2, n), largest=False).values
        a, b = bot[i], bot[min(i + 1, n - 1)]
    return float(torch.lerp(a.double(), b.double(), frac))


class PercentileObserver:
    """Per-batch (100 − p)-th and p-th percentiles of x, combined by their element-count-weighted mean."""

    def __init__(self, p: float = 99.99):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
            raise BadInput(f"percentile p must be a number in (50, 100]; got {p!r}")
        self.p = float(p)
        self.lo_sum, self.hi_sum, self.count = 0.0, 0.0, 0

    def update(self, x: Tensor) -> None:
        flat = _flat(x)
        n = flat.numel()
        if n:
            _finite_minmax(flat)
            q = self.p / 100
            self.lo_sum += _quantile_tail(flat, 1 - q) * n
            self.hi_sum += _quantile_tail(flat, q) * n
            self.count += n

    def range(self) -> tuple[float, float]:
        _check_seen(self)
        return self.lo_sum / self.count, self.hi_sum / self.count

    def qparams(self) -> tuple[float, int]:
        return act_qparams(*self.range())


class MSEObserver:
    """The shrink of the min-max range with the least quantization MSE on a bounded random sample."""

    def __init__(self, sample_size: int = 65536, factors: int = 100, min_factor: float = 0.01, seed: int = 0):
        if sample_size < 1 or factors < 1 or not 0 < min_factor <= 1:
            raise BadInput(f"MSEObserver needs sample_size >= 1, factors >= 1, 0 < min_factor <= 1; got "
                           f"{sample_size}, {factors}, {min_factor}")
        self.sample_size, self.factors, self.min_factor = sample_size, factors, min_factor
        self._gen = torch.Generator().manual_seed(seed)
        self.keys, self.sample = torch.empty(0), torch.empty(0)  # sample: [≤ sample_size] float32, CPU
        self.lo, self.hi, self.count = math.inf, -math.inf, 0

    def update(self, x: Tensor) -> None:
        flat = _flat(x)
        n = flat.numel()
        if not n:
            return
        lo, hi = _finite_minmax(flat)
        self.lo, self.hi, self.count = min(self.lo, lo), max(self.hi, hi), self.count + n
        # Bottom-k of uniform random keys over everything seen is a uniform sample without replacement.
        keys = torch.rand(n, generator=self._gen)
        if n > self.sample_size:
            keys, idx = keys.topk(self.sample_size, largest=False)
            vals = flat[idx.to(flat.device)].cpu()
        else:
            vals = flat.cpu()
        keys, vals = torch.cat([self.keys, keys]), torch.cat([self.sample, vals])
        if keys.numel() > self.sample_size:
            keys, idx = keys.topk(self.sample_size, largest=False)
            vals = vals[idx]
        self.keys, self.sample = keys, vals

    def search(self) -> tuple[float, float, float]:
        """(best factor, its MSE on the sample, min-max's MSE on the sample)."""
        _check_seen(self)
        factors = torch.linspace(1.0, self.min_factor, self.factors).tolist()
        qp = torch.tensor([act_qparams(self.lo * f, self.hi * f) for f in factors], dtype=torch.float64)
        s, z = qp[:, :1].float(), qp[:, 1:].float()  # [F, 1] each
        errs, step = [], max(1, (1 << 22) // self.sample.numel())  # [step, K] ≤ 4M values (16 MB) at a time
        for i in range(0, len(factors), step):
            si, zi = s[i:i + step], z[i:i + step]
            codes = torch.clamp(torch.round(self.sample * (1 / si) + zi), ACT_QMIN, ACT_QMAX)
            errs.append(((codes - zi) * si - self.sample).double().pow(2).mean(dim=1))
        err = torch.cat(errs)
        best = int(torch.argmin(err))  # the first minimum: factor 1 (tried first) wins ties
        return factors[best], float(err[best]), float(err[0])

    def range(self) -> tuple[float, float]:
        f = self.search()[0]
        return self.lo * f, self.hi * f

    def qparams(self) -> tuple[float, int]:
        return act_qparams(*self.range())


def _check_seen(obs) -> None:
    if not obs.count:
        raise BadInput(f"{type(obs).__name__} has seen no activations: no calibration data reached it")


OBSERVERS: dict[str, type] = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(observer: str | Callable[[], object] = "minmax", **kwargs):
    """A fresh observer from a name in OBSERVERS (with constructor kwargs, e.g. p=99.9) or a zero-arg factory."""
    if callable(observer) and not isinstance(observer, str):
        return observer(**kwargs)
    cls = OBSERVERS.get(str(observer).lower())
    if cls is None:
        raise BadInput(f"unknown activation observer {observer!r} (known: {', '.join(OBSERVERS)})")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise BadInput(f"observer {observer!r}: {e}") from None


def _run(model: torch.nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        ids = getattr(batch, "ids", batch)  # a data.Window, or a tensor
        if isinstance(ids, Tensor) and ids.dim() == 1 and not ids.is_floating_point():
            ids = ids[None]  # one sequence of token ids: [T] → [1, T]
        model(ids)


def calibrate_activations(model: torch.nn.Module, layers: dict[str, torch.nn.Module], batches: Iterable,
                          observer: str | Callable[[], object] = "minmax",
                          **observer_kwargs) -> dict[str, tuple[float, int]]:
    """Run `batches` through `model` and return each layer's static activation grid {name: (scale, zero)}.

    layers: {qualified name: module} whose INPUT is observed (the first positional argument, or `input=`).
    batches: an iterable; each item is fed as model(item) (token ids [B, T], a [T] id tensor, a data.Window),
    model(**item) for a mapping, model(*item) for a tuple or list. The model runs in eval mode under
    torch.inference_mode(); hooks are removed and train/eval flags restored afterwards, even on error.
    observer: "minmax", "percentile" or "mse" (kwargs to its constructor, e.g. p=99.9), or a factory.
    Raises BadInput for an unknown observer, no layers, no batches, a layer no batch reached, or inf/NaN.
    """
    if not layers:
        raise BadInput("calibrate_activations: no layers to calibrate")
    observers = {name: make_observer(observer, **observer_kwargs) for name in layers}

    def hook_for(obs):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            obs.update(x)
        return hook

    handles = []
    modes = {m: m.training for m in model.modules()}
    n_batches = 0
    try:
        for name, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(hook_for(observers[name]), with_kwargs=True))
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                _run(model, batch)
                n_batches += 1
            if n_batches == 0:
                raise BadInput("calibrate_activations: no calibration batches were given")
            unseen = [name for name, obs in observers.items() if not obs.count]
            if unseen:
                raise BadInput(f"no calibration data reached layer(s) {', '.join(unseen[:4])}"
                               f"{' …' if len(unseen) > 4 else ''}: they are not on the model's forward path")
            return {name: obs.qparams() for name, obs in observers.items()}
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
