"""compress(model, recipe): apply each step of a recipe in order. The dispatch table is here and only here."""

from __future__ import annotations

import re
import time

import torch

from . import recipe as R
from .errors import BadInput
from .nn import is_float_linear, linear_weight


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every float linear layer by qualified name (a shared module once): nn.Linear, and GPT-2's Conv1D (a
    linear with W stored as [I, O]). MultiheadAttention's out_proj is left out: attention reads its weight."""
    return {name: mod for name, mod in model.named_modules() if is_float_linear(mod)}


def select(model: torch.nn.Module, step) -> dict[str, torch.nn.Module]:
    """The float linear layers a step applies to (its `targets` and `ignore` regexes on qualified names)."""
    out = {}
    for name, mod in linear_layers(model).items():
        if step.targets is not None and not re.search(step.targets, name):
            continue
        if step.ignore is not None and re.search(step.ignore, name):
            continue
        out[name] = mod
    if not out:
        raise BadInput(f"{type(step).__name__}: targets={step.targets!r} ignore={step.ignore!r} match no float "
                       f"linear layer of this {type(model).__name__}")
    return out


def replace_layers(model: torch.nn.Module, step, convert, progress: bool = False) -> None:
    """Replace every layer `step` selects by convert(layer, step), in place; a layer reachable under several
    names (shared) is converted once and replaced under all of them."""
    from .eval.report import progress_bar

    layers = select(model, step)
    new: dict[int, torch.nn.Module] = {}
    with progress_bar(len(layers), type(step).__name__, progress, unit="layer") as bar:
        for mod in layers.values():
            new[id(mod)] = convert(mod, step)
            bar.update(1)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _int8_dynamic(mod: torch.nn.Module, step) -> torch.nn.Module:
    from .nn.int8_dynamic import Int8DynamicLinear

    return Int8DynamicLinear.from_linear(_as_linear(mod))


def _as_linear(mod: torch.nn.Module) -> torch.nn.Linear:
    if isinstance(mod, torch.nn.Linear):
        return mod
    w = linear_weight(mod)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return lin


def _rtn(mod, step):
    from .quant.rtn import quantize_rtn

    return quantize_rtn(mod, step)


def _hqq(mod, step):
    from .quant.hqq import quantize_hqq

    return quantize_hqq(mod, step)


def _int8_static(lm, model, step, data, progress):
    from .nn.int8_static import Int8StaticLinear
    from .quant.activations import calibrate_activations

    layers = select(model, step)
    if data is None:
        if not hasattr(lm, "tokenizer"):
            raise BadInput("W8A8Static calibrates activation ranges: pass data=[token id batches [B, T]]")
        data = default_calibration(lm)
    kw = {"p": step.percentile} if step.observer == "percentile" else {}
    qp = calibrate_activations(model, layers, data, observer=step.observer, **kw)
    by_id = {id(m): qp[n] for n, m in layers.items()}
    replace_layers(model, step, lambda mod, _s: Int8StaticLinear.from_linear(mod, *by_id[id(mod)]), progress)


def _sequential(lm, model, step, data, progress, algorithm):
    """A calibrated step through the sequential engine: `algorithm` is a module with init_stats / update_stats
    / apply (calibrate.py)."""
    from .calibrate import all_targets, run_sequential
    from .models.arch import arch_for

    wanted = select(model, step)  # the usual error when targets/ignore match no float linear layer
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise BadInput(f"{type(step).__name__} runs block by block: it needs a transformers model whose family "
                       f"has an ArchSpec, not a {type(model).__name__}")
    spec = arch_for(model_type)
    outside = sorted(set(wanted) - set(all_targets(model, spec, step)))
    if outside:
        raise BadInput(f"{type(step).__name__} compresses the linear layers inside the model's blocks, and the step "
                       f"also selects {', '.join(outside[:3])}{' …' if len(outside) > 3 else ''}: add "
                       f"{'it' if len(outside) == 1 else 'them'} to `ignore` (a data-free step such as RTN can take them)")
    if data is None:
        if not hasattr(lm, "tokenizer"):
            raise BadInput(f"{type(step).__name__} calibrates on activations: pass data=[token id batches [B, T]]")
        data = default_calibration(lm)
    info = run_sequential(model, spec, data, algorithm, step, progress)
    if hasattr(lm, "info"):
        lm.info.setdefault("calibration", []).append(
            {"step": type(step).__name__, **{k: info[k] for k in ("seconds", "capture_s", "peak_rss_mb")}})


def _gptq(lm, model, step, data, progress):
    from .quant import gptq

    _sequential(lm, model, step, data, progress, gptq)


def _magnitude(mod, step):
    from .prune.magnitude import prune_magnitude

    return prune_magnitude(mod, step)  # zeroes in place; returns the same module


def _wanda(lm, model, step, data, progress):
    from .prune import wanda

    _sequential(lm, model, step, data, progress, wanda)


def _sparsegpt(lm, model, step, data, progress):
    from .prune import sparsegpt

    _sequential(lm, model, step, data, progress, sparsegpt)


def _awq(lm, model, step, data, progress):
    from .quant import awq

    _sequential(lm, model, step, data, progress, awq)


def _smoothquant(lm, model, step, data, progress):
    from .quant import smoothquant

    _sequential(lm, model, step, data, progress, smoothquant)


def _qat(lm, model, step, data, progress):
    from .quant.qat import qat

    select(model, step)  # the usual error when targets/ignore match no float linear layer
    qat(model, step, tokenizer=getattr(lm, "tokenizer", None), progress=progress)  # trains under enable_grad()


# The dispatch tables. Per-layer steps: step config -> convert(layer, step). Whole-model steps (they
# calibrate or train across layers): step config -> fn(lm, model, step, calibration batches or None, progress).
CONVERT = {R.RTN: _rtn, R.HQQ: _hqq, R.W8A8Dynamic: _int8_dynamic, R.Magnitude: _magnitude}
WHOLE_MODEL = {R.W8A8Static: _int8_static, R.QAT: _qat, R.GPTQ: _gptq, R.Wanda: _wanda, R.SparseGPT: _sparsegpt,
               R.AWQ: _awq, R.SmoothQuant: _smoothquant}


def default_calibration(lm, n: int = 16, length: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Calibration batches [8, length] from the built-in corpus (never an evaluation text)."""
    from .data import builtin_text, calibration_windows, tokenize

    wins = calibration_windows(tokenize(lm.tokenizer, builtin_text()), n, length, seed)
    return [torch.stack([w.ids for w in wins[i:i + 8]]) for i in range(0, n, 8)]


def round_float_leftovers(model: torch.nn.Module) -> None:
    """Round the weights a recipe left in float (embeddings, norms, a float lm_head) to fp16 values, in place,
    so that they save in half the bytes (models.io stores exactly-fp16 tensors as fp16). Tensors beyond fp16's
    range stay as they are."""
    for mod in model.modules():
        if callable(getattr(mod, "lmpress_format", None)):
            continue
        for p in mod.parameters(recurse=False):
            if p.dtype == torch.float32 and p.numel() and p.detach().abs().max() < 65504:
                p.data.copy_(p.data.half())


def compress(lm, recipe, progress: bool = False, data: list[torch.Tensor] | None = None, round_floats: bool = True):
    """Apply `recipe` (a preset name, a YAML/JSON path, or a list of steps) to `lm` in place; returns `lm`.

    `lm` is a LoadedModel (its recipe grows by the steps applied, and is saved in the manifest) or any
    nn.Module (then the module is returned). `data`: calibration batches of token ids [B, T] for steps that
    need them (default for a LoadedModel: default_calibration). `round_floats`: round what stays float to fp16
values (round_float_leftovers) so a LoadedModel saves small; off for a step meant to be function-preserving."""
    steps = R.load_recipe(recipe)
    model = getattr(lm, "model", lm)
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in steps:
            if type(step) in WHOLE_MODEL:
                WHOLE_MODEL[type(step)](lm, model, step, data, progress)
            else:
                replace_layers(model, step, CONVERT[type(step)], progress)
    if hasattr(lm, "recipe"):
        if round_floats:
            round_float_leftovers(model)
        lm.recipe = list(lm.recipe) + [R.to_dict(s) for s in steps]
        lm.info["compress_s"] = time.perf_counter() - t0
    return lm
