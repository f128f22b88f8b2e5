"""Recipes: an ordered list of steps, each a small frozen config dataclass with validated fields.

    [RTN(bits=4, group_size=128)]                          weight-only round-to-nearest, 4 bits, groups of 128
    [HQQ(bits=3, group_size=64)]                           half-quadratic zero-point optimization, no data
    [W8A8Dynamic()]                                        int8 weights and per-call int8 activations
    [W8A8Static(observer="mse")]                           int8 activations on ranges from calibration data
    [RTN(8, None, targets=r"self_attn"), RTN(4, 64)]       mixed widths: attention int8, the rest 4-bit

Every step chooses its modules with two regular expressions on qualified module names (`re.search`):
`targets` (None = every linear layer) and `ignore` (default: the output head `lm_head`; embeddings are not
linear layers and stay in float). A module converted by an earlier step is not touched by a later one, so
put the most specific step first. A step that matches no module is an error.

Recipes are written as YAML or JSON: a list of steps, each `{"step": "RTN", "bits": 4, ...}` (or a mapping
with a `steps` key holding that list). Unknown steps or keys are errors. Named presets: PRESETS.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

DEFAULT_IGNORE = r"(^|\.)lm_head$"


def _check_regex(value: str | None, field: str) -> None:
    if value is None:
        return
    try:
        re.compile(value)
    except re.error as e:
        raise BadInput(f"{field}: invalid regular expression {value!r} ({e})") from None


def _check_bits(bits, allowed=range(2, 9)) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise BadInput(f"bits must be an integer in {allowed.start}..{allowed.stop - 1}, got {bits!r}")


def _check_group(group_size) -> None:
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                   or group_size < 1):
        raise BadInput(f"group_size must be a positive integer or null (per output channel), got {group_size!r}")


@dataclass(frozen=True)
class RTN:
    """Weight-only round-to-nearest. symmetric=True is "uniform" (zero-point fixed at the middle), False is
    "min-max" (integer zero-point); clip=True searches the MSE-optimal shrink of each group's range."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    clip: bool = False
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group(self.group_size)
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class HQQ:
    """Half-Quadratic Quantization (Badri & Shaji, 2023): min-max scales, zero-points refined by a proximal
    solver that minimises an lp-norm (p < 1) of the weight error; the weights are fitted without data. start:
    the zero-points' starting point, "rtn" (RTN's integer zero), "minmax" (the fractional zero that keeps each
    group's min and max on the grid; far better on Qwen2.5-0.5B at 3 bits, far worse on SmolLM2) or "auto"
    (the default: both, and the model closer to the float one on a short check text wins; quant/hqq.py)."""

    bits: int = 4
    group_size: int | None = 64
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    start: str = "auto"
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group(self.group_size)
        if not isinstance(self.iters, int) or self.iters < 1:
            raise BadInput(f"iters must be a positive integer, got {self.iters!r}")
        if self.start not in ("auto", "rtn", "minmax"):
            raise BadInput(f"start must be auto, rtn or minmax, got {self.start!r}")
        if not 0 < self.lp_norm <= 1:
            raise BadInput(f"lp_norm must be in (0, 1], got {self.lp_norm!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class W8A8Dynamic:
    """int8 weights (symmetric, per output channel) and int8 activations quantized at run time, on PyTorch's
    int8 kernels (fbgemm/onednn)."""

    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class W8A8Static:
    """int8 weights (symmetric, per output channel) and int8 activations on one static grid per layer (per
    tensor, uint8 0..127) whose range is observed on calibration data: "minmax", "percentile" (p = percentile)
    or "mse"."""

    observer: str = "minmax"
    percentile: float = 99.99
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        if self.observer not in ("minmax", "percentile", "mse"):
            raise BadInput(f"observer must be minmax, percentile or mse, got {self.observer!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 < self.percentile <= 100:
            raise BadInput(f"percentile must be in (50, 100], got {self.percentile!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training (quant/qat.py): weights fake-quantized on RTN's grid, fine-tuned through a
    straight-through estimator towards the float model's logits ("kl"), the data ("ce") or both, then stored
    packed like RTN. data: a load_text spec, or "self" = n_samples sequences sampled from the float model."""

    bits: int = 3
    group_size: int | None = 64
    symmetric: bool = False
    learn_scale: bool = False
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 256
    n_samples: int = 128
    optimizer: str = "adamw"
    loss: str = "kl"
    data: str = "self"
    seed: int = 0
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group(self.group_size)
        for name, low in (("steps", 1), ("batch_size", 1), ("n_samples", 1), ("seq_len", 2), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise BadInput(f"QAT {name} must be an integer >= {low}, got {v!r}")
        try:
            object.__setattr__(self, "lr", float(self.lr))  # YAML 1.1 reads `lr: 1e-4` as a string
        except (TypeError, ValueError):
            raise BadInput(f"QAT lr must be a number, got {self.lr!r}") from None
        if not 0 < self.lr < float("inf"):
            raise BadInput(f"QAT lr must be positive, got {self.lr!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise BadInput(f"QAT optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.loss not in ("kl", "ce", "kl+ce"):
            raise BadInput(f"QAT loss must be kl, ce or kl+ce, got {self.loss!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al., 2022; quant/gptq.py): weight-only quantization calibrated on activations. Each
    layer's columns are quantized in turn and each column's rounding error is compensated on the columns not
    yet quantized, through the inverse Hessian of the layer's output error on calibration inputs; runs in the
    sequential engine (calibrate.py). damp: fraction of mean(diag H) added to H's diagonal (raised x10 when
    H will not factor). act_order: quantize the most active input columns first; with groups it needs
    static_groups=True (every group's parameters chosen up front on the original weight, so groups stay
    contiguous and store packed like RTN's). block_size: columns per lazy update, a speed knob. keep_zeros:
    weights that are exactly 0 stay 0 (a pruned layer keeps its sparsity pattern, e.g. after SparseGPT).
    sink_weight: how many times each calibration sequence's first position (the attention sink, whose keys
    and values every later token reads) counts in the Hessian (quant/gptq.py hessian; 1 = plain GPTQ).
    grid: where each group's scale and zero come from: "minmax" (the group's range, integer zero; dynamic
    per group unless static_groups) or "hqq" (HQQ's fractional zeros on the original weight, chosen up front,
    asymmetric only; not after pruning, whose zeros it cannot hold)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    keep_zeros: bool = True
    sink_weight: float = 64.0
    grid: str = "minmax"
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group(self.group_size)
        if self.grid not in ("minmax", "hqq"):
            raise BadInput(f"GPTQ grid must be 'minmax' or 'hqq', got {self.grid!r}")
        if self.grid == "hqq" and self.symmetric:
            raise BadInput("GPTQ grid='hqq' is asymmetric (fractional zero-points): drop symmetric=True")
        sw = self.sink_weight
        if isinstance(sw, bool) or not isinstance(sw, (int, float)) or not 1 <= sw < float("inf"):
            raise BadInput(f"GPTQ sink_weight must be a number >= 1, got {sw!r}")
        if isinstance(self.damp, bool):
            raise BadInput(f"GPTQ damp must be a number >= 0, got {self.damp!r}")
        try:
            object.__setattr__(self, "damp", float(self.damp))  # YAML 1.1 reads `damp: 1e-2` as a string
        except (TypeError, ValueError):
            raise BadInput(f"GPTQ damp must be a number >= 0, got {self.damp!r}") from None
        if not 0 <= self.damp < float("inf"):
            raise BadInput(f"GPTQ damp must be a number >= 0, got {self.damp!r}")
        _check_flags(self, "symmetric", "act_order", "static_groups", "keep_zeros")
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise BadInput("GPTQ act_order with groups needs static_groups=True: the groups must stay contiguous "
                           "in the original column order to be stored packed")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise BadInput(f"GPTQ block_size must be a positive integer, got {self.block_size!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


# The GPTQ presets quantize the most active input columns first, with every group's parameters chosen up front.
# SmolLM2-135M w4 g128, self:128x512 calibration, 40 WikiText-2 windows: KLD 0.2675 in the original column order,
# 0.1874 with act-order + static groups (RTN 0.3786); benchmarks/calibrated.md.
GPTQ_PRESET = dict(act_order=True, static_groups=True)


def _check_prune(step) -> None:
    """sparsity in [0, 1) (stored as a float), pattern None or "N:M" with 1 <= N < M, the two regexes."""
    from .prune.masks import check_sparsity, parse_pattern

    name = type(step).__name__
    try:
        object.__setattr__(step, "sparsity", check_sparsity(step.sparsity))
        parse_pattern(step.pattern)
    except BadInput as e:
        raise BadInput(f"{name}: {e}") from None
    _check_regex(step.targets, "targets")
    _check_regex(step.ignore, "ignore")


@dataclass(frozen=True)
class Magnitude:
    """Magnitude pruning (prune/magnitude.py), data-free: zero the smallest |W| of each output row (exactly
    floor(sparsity · in_features) per row), or with pattern "N:M" keep the N largest of every M consecutive
    inputs ("2:4", "4:8"; sparsity is then ignored). Pruned layers stay dense, with exact zeros."""

    sparsity: float = 0.5
    pattern: str | None = None
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_prune(self)


@dataclass(frozen=True)
class Wanda(Magnitude):
    """Wanda (Sun et al., 2023; prune/wanda.py): prune by |W_ij|·‖X_j‖₂, the weight times its input feature's
    norm on calibration data, per output row (exactly floor(sparsity · in_features)) or N:M ("2:4": 2 kept of
    every 4 consecutive inputs; sparsity then ignored). No weight update; runs in the sequential engine.
    Same fields as Magnitude; a distinct step (dispatch is by exact type)."""


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT (Frantar & Alistarh, 2023; prune/sparsegpt.py): OBS pruning through the inverse Hessian of
    each layer's output error, the kept weights updated to compensate; unstructured (exactly
    floor(sparsity · O · I) per layer, the mask chosen adaptively per block of `block_size` columns — smaller
    blocks spread sparsity more evenly over the columns) or N:M. bits set: the kept weights are quantized in
    the same pass on GPTQ's grid (group_size, symmetric), 0 always on the grid, and the layer is stored packed
    like GPTQ's. damp: fraction of mean(diag H) added to H's diagonal (raised x10 when H will not factor)."""

    sparsity: float = 0.5
    pattern: str | None = None
    bits: int | None = None
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_prune(self)
        if self.bits is not None:
            _check_bits(self.bits)
        _check_group(self.group_size)
        if isinstance(self.damp, bool):
            raise BadInput(f"SparseGPT damp must be a number >= 0, got {self.damp!r}")
        try:
            object.__setattr__(self, "damp", float(self.damp))  # YAML 1.1 reads `damp: 1e-2` as a string
        except (TypeError, ValueError):
            raise BadInput(f"SparseGPT damp must be a number >= 0, got {self.damp!r}") from None
        if not 0 <= self.damp < float("inf"):
            raise BadInput(f"SparseGPT damp must be a number >= 0, got {self.damp!r}")
        if not isinstance(self.symmetric, bool):
            raise BadInput(f"SparseGPT symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise BadInput(f"SparseGPT block_size must be a positive integer, got {self.block_size!r}")


PRUNE_METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def pruning(method: str, sparsity: float = 0.5, pattern: str | None = None, **fields) -> list:
    """`lmpress prune --method wanda --sparsity 0.5 --pattern 2:4` → [Wanda(sparsity=0.5, pattern="2:4")];
    fields: any other field of the step (e.g. bits=4 for SparseGPT)."""
    cls = PRUNE_METHODS.get(str(method).strip().lower())
    if cls is None:
        raise BadInput(f"unknown pruning method '{method}' (magnitude, wanda or sparsegpt)")
    return [from_dict({"step": cls.__name__, "sparsity": sparsity, "pattern": pattern, **fields})]


@dataclass(frozen=True)
class AWQ:
    """AWQ (Lin et al., 2023; quant/awq.py): weight-only quantization that first scales up the input columns
    carrying large activations (W·diag(s)) and folds 1/s into the op before (a norm, or v/up_proj), with
    s = mean|X|^α and α the best of `grid` values in [0, 1) for the output error of each group of linears
    sharing an input; then RTN codes of the scaled weight, each group's range clipped to the output-optimal
    shrink when clip=True. Runs in the sequential engine. scale_only=True folds the scales and leaves the
    layers float, for a following quantizer ([AWQ(scale_only=True), GPTQ(4, 128)]). duo_scaling=True
    searches s = mean|X|^α / mean(|W|/max|W|)^(1−α) instead (AutoAWQ's default; worse on SmolLM2-135M)."""

    bits: int = 4
    group_size: int | None = 128
    grid: int = 20
    clip: bool = True
    scale_only: bool = False
    duo_scaling: bool = False
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group(self.group_size)
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
            raise BadInput(f"AWQ grid must be an integer >= 1, got {self.grid!r}")
        for name in ("clip", "scale_only", "duo_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise BadInput(f"AWQ {name} must be true or false, got {getattr(self, name)!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al., 2022; quant/smoothquant.py): divides each input channel of a group of
    linears by s = max|X|^α / max|W|^(1−α), folded into the op before, and multiplies the weights' columns
    by s, so that activation outliers move into the weights. The model stays float (unchanged up to
    rounding); put a W8A8Dynamic or W8A8Static step after it. alpha_search: each group takes the α (or no
    smoothing) of the lowest simulated W8A8 output error on calibration inputs."""

    alpha: float = 0.5
    alpha_search: bool = False
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        if isinstance(self.alpha, bool):
            raise BadInput(f"SmoothQuant alpha must be a number in [0, 1], got {self.alpha!r}")
        try:
            object.__setattr__(self, "alpha", float(self.alpha))
        except (TypeError, ValueError):
            raise BadInput(f"SmoothQuant alpha must be a number in [0, 1], got {self.alpha!r}") from None
        if not 0 <= self.alpha <= 1:
            raise BadInput(f"SmoothQuant alpha must be a number in [0, 1], got {self.alpha!r}")
        if not isinstance(self.alpha_search, bool):
            raise BadInput(f"SmoothQuant alpha_search must be true or false, got {self.alpha_search!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


def _check_numbers(step, spec: dict) -> None:
    """spec: {field: (kind, low, high)}; kind int or float, bounds inclusive (None: open). Floats are stored as
    float (YAML 1.1 reads `lr: 1e-4` as a string); booleans are refused."""
    name = type(step).__name__
    for field, (kind, low, high) in spec.items():
        v = getattr(step, field)
        ok = not isinstance(v, bool)
        if ok and kind is float:
            try:
                v = float(v)
                object.__setattr__(step, field, v)
            except (TypeError, ValueError):
                ok = False
        elif ok:
            ok = isinstance(v, int)
        if not ok or not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            rng = f"{'>= ' + str(low) if low is not None else ''}{' and ' if low is not None and high is not None else ''}" \
                  f"{'<= ' + str(high) if high is not None else ''}"
            raise BadInput(f"{name} {field} must be {'an integer' if kind is int else 'a number'} {rng}, got "
                           f"{getattr(step, field)!r}")


def _check_flags(step, *fields) -> None:
    for f in fields:
        if not isinstance(getattr(step, f), bool):
            raise BadInput(f"{type(step).__name__} {f} must be true or false, got {getattr(step, f)!r}")


@dataclass(frozen=True)
class StructuredPrune:
    """Structured pruning (prune/structured.py): remove attention heads ("heads"; GQA kept intact by removing
    the same number of query heads per KV group, head_unit="query", or whole KV groups, "group"), MLP channels
    ("mlp") or blocks ("depth"), ranked by importance: magnitude (data-free), activation, taylor (calibration
    gradients) or influence (1 − cos of a block's input and output; depth only). ratio: fraction of each
    layer's units removed (floor), in [0, 1), or a list of one per layer (the stored width is then the widest:
    extra units are zeroed); target_params instead: the least uniform removal reaching that count. The model
    becomes smaller and dense; its config is shrunk (plain transformers loads it). Calibration: n_samples
    windows of seq_len tokens of the built-in corpus (activation, taylor, influence)."""

    unit: str = "mlp"
    ratio: float | list = 0.25
    importance: str = "magnitude"
    head_unit: str = "query"
    target_params: int | None = None
    n_samples: int = 16
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        from .prune.structured import HEAD_UNITS, UNITS, _check_unit_importance, check_choice, check_ratio

        if isinstance(self.ratio, tuple):
            object.__setattr__(self, "ratio", list(self.ratio))
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        _check_unit_importance(check_choice(self.unit, UNITS, "structured unit"), self.importance)
        check_choice(self.head_unit, HEAD_UNITS, "head unit")
        if self.target_params is not None:
            _check_numbers(self, {"target_params": (int, 1, None)})
        _check_numbers(self, {"n_samples": (int, 1, None), "seq_len": (int, 2, None), "seed": (int, 0, None)})


@dataclass(frozen=True)
class MagnitudeScope:
    """Magnitude pruning with the threshold shared per row, per layer or globally over all selected layers
    (prune/gradual.py): scope="global" prunes floor(sparsity · all their weights) smallest |w| overall."""

    sparsity: float = 0.5
    scope: str = "global"
    targets: str | None = None
    ignore: str | None = DEFAULT_IGNORE

    def __post_init__(self):
        from .prune.gradual import SCOPES
        from .prune.masks import check_sparsity

        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.scope not in SCOPES:
            raise BadInput(f"MagnitudeScope scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class SparseStorage:
    """Store float linear layers at least `min_sparsity` sparse as bitmask + non-zero values (nn/sparse.py):
    a 50% sparse float32 layer takes 17 bits per weight instead of 32. Forward = the dense reference."""

    min_sparsity: float = 0.3
    targets: str | None = None
    ignore: str | None = None

    def __post_init__(self):
        _check_numbers(self, {"min_sparsity": (float, 0.0, 1.0)})
        _check_regex(self.targets, "targets")
        _check_regex(self.ignore, "ignore")


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation (distill/train.py) of the model (the student, every parameter trained) from a
    teacher: `teacher` a model path, or None for the model as it was when the recipe started (recovery after
    pruning). Loss = kl_weight · KL(teacher ‖ student) at `temperature` (× T²) + hidden_weight · MSE of hidden
    states (a learned projection when widths differ) + ce_weight · next-token CE. topk: cache the teacher's
    top-k logits once (to `cache`, a safetensors file, or in memory) instead of running it every step.
    AdamW or SGD (momentum 0.9), linear warm-up over `warmup` of the steps then cosine to 0, gradients
    clipped to `clip`, `grad_accum` micro-batches per step. Data: n_samples windows of seq_len tokens of
    `data` (builtin, wikitext2-train, or a file; never the WikiText-2 test text), eval_samples more held out
    for the perplexity the progress bar shows every eval_every steps. checkpoint_dir: a checkpoint every
    checkpoint_every steps, resumed from when present. sparsity: gradual magnitude pruning to that target
    (cubic, until sparsity_end of the steps, scope row/layer/global); otherwise layers already sparse keep
    their zeros (keep_zeros). amp: bfloat16 autocast, on CUDA only."""

    teacher: str | None = None
    steps: int = 100
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 256
    n_samples: int = 64
    grad_accum: int = 1
    warmup: float = 0.05
    clip: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0
    ce_weight: float = 0.0
    topk: int | None = None
    cache: str | None = None
    data: str = "builtin"
    eval_samples: int = 4
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    grad_checkpointing: bool = False
    amp: bool = True
    sparsity: float | None = None
    sparsity_scope: str = "layer"
    sparsity_end: float = 0.75
    prune_every: int = 10
    keep_zeros: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        _check_numbers(self, {
            "steps": (int, 1, None), "lr": (float, 1e-12, None), "weight_decay": (float, 0.0, None),
            "batch_size": (int, 1, None), "seq_len": (int, 2, None), "n_samples": (int, 1, None),
            "grad_accum": (int, 1, None), "warmup": (float, 0.0, 1.0), "clip": (float, 0.0, None),
            "temperature": (float, 1e-6, None), "kl_weight": (float, 0.0, None), "hidden_weight": (float, 0.0, None),
            "ce_weight": (float, 0.0, None), "eval_samples": (int, 0, None), "eval_every": (int, 0, None),
            "checkpoint_every": (int, 0, None), "sparsity_end": (float, 0.0, 1.0), "prune_every": (int, 1, None),
            "seed": (int, 0, None)})
        if self.optimizer not in ("adamw", "sgd"):
            raise BadInput(f"Distill optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.kl_weight + self.hidden_weight + self.ce_weight == 0:
            raise BadInput("Distill: kl_weight, hidden_weight and ce_weight are all 0: nothing to train on")
        if self.topk is not None:
            _check_numbers(self, {"topk": (int, 1, None)})
            if self.hidden_weight > 0:
                raise BadInput("Distill: the hidden-state loss needs the teacher online; topk caching only "
                               "replaces its logits (set topk=None or hidden_weight=0)")
        if self.sparsity is not None:
            from .prune.gradual import SCOPES
            from .prune.masks import check_sparsity

            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
            if self.sparsity_scope not in SCOPES:
                raise BadInput(f"Distill sparsity_scope must be one of {', '.join(SCOPES)}, got {self.sparsity_scope!r}")
        if self.data == "wikitext2":
            raise BadInput("Distill data 'wikitext2' is the WikiText-2 *test* text used for evaluation: train on "
                           "builtin, wikitext2-train (wiki.train.raw beside it) or a file of your own")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"Distill device must be auto, cpu or cuda, got {self.device!r}")
        _check_flags(self, "grad_checkpointing", "amp", "keep_zeros")


STEPS: dict[str, type] = {cls.__name__: cls for cls in (RTN, HQQ, W8A8Dynamic, W8A8Static, QAT, GPTQ, Magnitude,
                                                        Wanda, SparseGPT, AWQ, SmoothQuant, StructuredPrune,
                                                        MagnitudeScope, SparseStorage, Distill)}

PRESETS: dict[str, list] = {
    "w8": [RTN(bits=8, group_size=None, symmetric=True)],
    "w8a8-dynamic": [W8A8Dynamic()],
    "w8a8-static": [W8A8Static()],
    "w8a8-static-mse": [W8A8Static(observer="mse")],
    "w4g128": [RTN(bits=4, group_size=128)],
    "w4g64": [RTN(bits=4, group_size=64)],
    "w4": [RTN(bits=4, group_size=None)],
    "w3g64": [RTN(bits=3, group_size=64)],
    "w2g32": [HQQ(bits=2, group_size=32)],
    "hqq-w4g128": [HQQ(bits=4, group_size=128)],
    "hqq-w4g64": [HQQ(bits=4, group_size=64)],
    "hqq-w3g64": [HQQ(bits=3, group_size=64)],
    "qat-w3g64": [QAT(bits=3, group_size=64)],
    "gptq-w4g128": [GPTQ(bits=4, group_size=128, **GPTQ_PRESET)],
    "gptq-w3g64": [GPTQ(bits=3, group_size=64, **GPTQ_PRESET)],
    "awq-w4g128": [AWQ(bits=4, group_size=128)],
    "awq-w3g64": [AWQ(bits=3, group_size=64)],
    "awq-gptq-w4g128": [AWQ(bits=4, group_size=128, scale_only=True), GPTQ(bits=4, group_size=128, **GPTQ_PRESET)],
    "awq-gptq-w3g64": [AWQ(bits=3, group_size=64, scale_only=True), GPTQ(bits=3, group_size=64, **GPTQ_PRESET)],
    "smoothquant-w8a8": [SmoothQuant(alpha=0.5), W8A8Dynamic()],
    "magnitude-50": [Magnitude(0.5)],
    "magnitude-2:4": [Magnitude(pattern="2:4")],
    "wanda-50": [Wanda(0.5)],
    "wanda-2:4": [Wanda(pattern="2:4")],
    "sparsegpt-50": [SparseGPT(0.5)],
    "sparsegpt-2:4": [SparseGPT(pattern="2:4")],
    "sparsegpt-2:4-w4g128": [SparseGPT(pattern="2:4", bits=4, group_size=128)],
    "sparsegpt-2:4+gptq-w4g128": [SparseGPT(pattern="2:4"), GPTQ(bits=4, group_size=128, **GPTQ_PRESET)],
}


def to_dict(step) -> dict:
    return {"step": type(step).__name__, **dataclasses.asdict(step)}


def from_dict(d: dict):
    if not isinstance(d, dict) or "step" not in d:
        raise BadInput(f"a recipe step must be a mapping with a 'step' key, got {d!r}")
    name = d["step"]
    cls = STEPS.get(name) or {k.lower(): v for k, v in STEPS.items()}.get(str(name).lower())
    if cls is None:
        raise BadInput(f"unknown recipe step '{name}' (known: {', '.join(STEPS)})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields - {"step"})
    if unknown:
        raise BadInput(f"recipe step {cls.__name__}: unknown key(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(fields))})")
    try:
        return cls(**{k: v for k, v in d.items() if k != "step"})
    except TypeError as e:
        raise BadInput(f"recipe step {cls.__name__}: {e}") from None


def load_recipe(spec) -> list:
    """A recipe from a preset name, a YAML/JSON file, a list of step configs or of dicts."""
    if isinstance(spec, (list, tuple)):
        steps = [s if type(s) in STEPS.values() else from_dict(s) for s in spec]
    elif isinstance(spec, str) and spec in PRESETS:
        steps = list(PRESETS[spec])
    elif isinstance(spec, (str, Path)) and Path(spec).is_file():
        steps = _read_file(Path(spec))
    else:
        raise BadInput(f"unknown recipe '{spec}': give a preset ({', '.join(PRESETS)}) or a .yaml/.json file")
    if not steps:
        raise BadInput("the recipe has no steps")
    return steps


def _read_file(path: Path) -> list:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"steps"})
        if extra:
            raise BadInput(f"{path}: unknown top-level key(s) {', '.join(extra)} (expected 'steps')")
        data = data.get("steps")
    if not isinstance(data, list):
        raise BadInput(f"{path}: a recipe is a list of steps (or a mapping with 'steps')")
    return [from_dict(d) for d in data]


def scheme(text: str, method: str = "rtn") -> list:
    """`--scheme w4g128 --method hqq` → [HQQ(bits=4, group_size=128)]; 'w8' is per channel."""
    m = re.fullmatch(r"w(\d+)(?:g(\d+))?", text.strip().lower())
    if not m:
        raise BadInput(f"unknown scheme '{text}': use wBITS[gGROUP], e.g. w4g128, w8, w3g64")
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if method == "rtn":
        return [RTN(bits=bits, group_size=group, symmetric=bits == 8)]
    if method == "hqq":
        return [HQQ(bits=bits, group_size=group)]
    raise BadInput(f"unknown method '{method}' (rtn or hqq)")


def dumps(steps: list) -> str:
    return json.dumps([to_dict(s) for s in steps])
