"""Module formats: one class per stored format (int8 dynamic, packed int2/3/4/8 weight-only, ...).

Each class has a `format` name, `lmpress_format()` (its manifest entry), `empty(...)` (right-shaped buffers to
load a saved state into) and `dequantize()` (the float weight, for reference paths). `FORMATS` is the one
table from format name to class; the loader builds saved models from it. nn/ never imports an algorithm.
"""

from __future__ import annotations

import inspect

import torch

FORMATS: dict[str, type[torch.nn.Module]] = {}


def register_formats() -> dict[str, type[torch.nn.Module]]:
    """Fill FORMATS from the format modules (imported here, once, so the table lives in one place)."""
    if not FORMATS:
        from .int8_dynamic import Int8DynamicLinear
        from .int8_static import Int8StaticLinear
        from .packed import PackedLinear
        from .sparse import SparseLinear

        for cls in (Int8DynamicLinear, Int8StaticLinear, PackedLinear, SparseLinear):
            for name in getattr(cls, "formats", None) or (cls.format,):
                FORMATS[name] = cls
    return FORMATS


def build_module(entry: dict) -> torch.nn.Module:
    """An empty module of the format a manifest entry names, shaped to receive its saved state."""
    from ..errors import UnsupportedModel

    cls = register_formats().get(entry.get("format"))
    if cls is None:
        raise UnsupportedModel(f"layer format '{entry.get('format')}' is unknown to this lmpress version")
    params = inspect.signature(cls.empty).parameters
    return cls.empty(**{k: v for k, v in entry.items() if k in params})


def linear_weight(mod: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as float32 [O, I] (GPT-2's Conv1D stores the transpose)."""
    w = mod.weight.detach()
    return (w.t() if type(mod).__name__ == "Conv1D" else w).float()


def is_float_linear(mod: torch.nn.Module) -> bool:
    """A linear layer still in float: nn.Linear or GPT-2's Conv1D (not MultiheadAttention's out_proj, whose
    weight attention reads directly). Converted layers are not."""
    name = type(mod).__name__
    return (isinstance(mod, torch.nn.Linear) or name == "Conv1D") and name != "NonDynamicallyQuantizableLinear"
