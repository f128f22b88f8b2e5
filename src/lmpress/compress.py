"""compress(model, recipe): apply each step of a recipe in order. The dispatch table is here and only here."""

from __future__ import annotations

import re
import time

import torch

from . import recipe as R
from .errors import BadInput
from .nn import linear_weight


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every float linear layer by qualified name (a shared module once): nn.Linear, and GPT-2's Conv1D (a
    linear with W stored as [I, O]). MultiheadAttention's out_proj is left out: attention reads its weight."""
    return {name: mod for name, mod in model.named_modules()
            if (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D")
            and type(mod).__name__ != "NonDynamicallyQuantizableLinear"}


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


# step config -> per-layer conversion (data-free steps); the one dispatch table
CONVERT = {R.RTN: _rtn, R.HQQ: _hqq, R.W8A8Dynamic: _int8_dynamic}


def compress(lm, recipe, progress: bool = False):
    """Apply `recipe` (a preset name, a YAML/JSON path, or a list of steps) to `lm` in place; returns `lm`.

    `lm` is a LoadedModel (its recipe grows by the steps applied, and is saved in the manifest) or any
    nn.Module (then the module is returned)."""
    steps = R.load_recipe(recipe)
    model = getattr(lm, "model", lm)
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in steps:
            replace_layers(model, step, CONVERT[type(step)], progress)
    if hasattr(lm, "recipe"):
        lm.recipe = list(lm.recipe) + [R.to_dict(s) for s in steps]
        lm.info["compress_s"] = time.perf_counter() - t0
    return lm
