"""compress(model, recipe): apply each step of a recipe in order. The dispatch table is here and only here."""

from __future__ import annotations

import re
import time

import torch

from . import recipe as R
from .errors import BadInput
from .nn import linear_weight


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every float linear layer by qualified name: nn.Linear, and GPT-2's Conv1D (a linear with W stored as [I, O])."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"}


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
                       f"linear layer of this model")
    return out


def _apply_rtn(model, step, progress):
    from .quant.rtn import quantize_rtn

    for name, mod in _bar(select(model, step), step, progress):
        model.set_submodule(name, quantize_rtn(mod, step))


def _apply_hqq(model, step, progress):
    from .quant.hqq import quantize_hqq

    for name, mod in _bar(select(model, step), step, progress):
        model.set_submodule(name, quantize_hqq(mod, step))


def _apply_w8a8_dynamic(model, step, progress):
    from .nn.int8_dynamic import Int8DynamicLinear

    for name, mod in _bar(select(model, step), step, progress):
        model.set_submodule(name, Int8DynamicLinear.from_linear(_as_linear(mod)))


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


def _bar(layers: dict, step, progress: bool):
    from .eval.report import progress_bar

    with progress_bar(len(layers), type(step).__name__, progress, unit="layer") as bar:
        for item in layers.items():
            yield item
            bar.update(1)


APPLY = {R.RTN: _apply_rtn, R.HQQ: _apply_hqq, R.W8A8Dynamic: _apply_w8a8_dynamic}


def compress(lm, recipe, progress: bool = False):
    """Apply `recipe` (a preset name, a YAML/JSON path, or a list of steps) to `lm` in place; returns `lm`.

    `lm` is a LoadedModel (its recipe grows by the steps applied, and is saved in the manifest) or any
    nn.Module (then the module is returned)."""
    steps = R.load_recipe(recipe)
    model = getattr(lm, "model", lm)
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in steps:
            APPLY[type(step)](model, step, progress)
    if hasattr(lm, "recipe"):
        lm.recipe = list(lm.recipe) + [R.to_dict(s) for s in steps]
        lm.info["compress_s"] = time.perf_counter() - t0
    return lm
