"""Saving: safetensors + config + tokenizer + the lmpress manifest, written atomically.

The folder is assembled under a temporary name beside the target and renamed into place only when
complete, so an interrupted save never leaves a folder that looks like a finished model.

Manifest (`lmpress.json`):
  format_version  1
  lmpress_version the version that wrote it
  created_utc     ISO time
  source          {"path", "kind"}: what was loaded before compression
  recipe          the ordered list of steps applied (each a dict with "step" and its fields); [] when none
  layers          {module name: {"format": "dense", "dtype": ..., "shape": [...]} | a quantized format's fields}

Float tensors are written in the narrowest of fp16 / bf16 / fp32 that holds their values exactly, so a
compressed model (whose float leftovers compress() rounds to fp16) stores them in half the bytes while
save→load stays bit-identical; an uncompressed fp32 model is stored as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from contextlib import contextmanager

import torch

from ..errors import BadInput, CorruptModel, UnsupportedModel

MANIFEST = "lmpress.json"
FORMAT_VERSION = 1


def layer_formats(model: torch.nn.Module) -> dict[str, dict]:
    """What each weight-bearing module is stored as. Module formats from lmpress.nn describe themselves."""
    out = {}
    for name, mod in model.named_modules():
        describe = getattr(mod, "lmpress_format", None)
        if callable(describe):
            out[name] = describe()
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or type(mod).__name__ == "Conv1D":
            w = mod.weight
            out[name] = {"format": "dense", "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape)}
    return out


def exact_storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest float dtype that holds every value of float32 tensor `t` exactly."""
    for dt in (torch.float16, torch.bfloat16):
        if torch.equal(t.to(dt).to(t.dtype), t):
            return dt
    return t.dtype


@contextmanager
def narrowed_floats(model: torch.nn.Module):
    """Temporarily store float32 parameters of float (non-lmpress) modules in their exact narrower dtype."""
    changed = []
    for mod in model.modules():
        if callable(getattr(mod, "lmpress_format", None)):
            continue  # quantized formats own their dtypes
        for p in mod.parameters(recurse=False):
            if p.dtype == torch.float32 and (dt := exact_storage_dtype(p.data)) != torch.float32:
                changed.append((p, p.dtype))
                p.data = p.data.to(dt)
    try:
        yield
    finally:
        for p, dt in changed:
            p.data = p.data.to(dt)


def build_manifest(lm, recipe: list[dict] | None = None) -> dict:
    from .. import __version__

    return {
        "format_version": FORMAT_VERSION,
        "lmpress_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": lm.source, "kind": lm.kind},
        "recipe": list(recipe if recipe is not None else lm.recipe),
        "layers": layer_formats(lm.model),
    }


def save(lm, out: str | os.PathLike, *, recipe: list[dict] | None = None, overwrite: bool = False) -> Path:
    """Write `lm` to folder `out` atomically. Returns the folder."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInput(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with narrowed_floats(lm.model):
            lm.model.save_pretrained(tmp)
            manifest = build_manifest(lm, recipe)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        install_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def install_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first and deleted after, so
    a crash leaves one of the two complete folders, never a half-written one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_manifest(folder: Path) -> dict:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptModel(f"{folder}/{MANIFEST} is not valid JSON: the saved model is corrupt") from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise UnsupportedModel(f"{folder}: manifest format {m.get('format_version') if isinstance(m, dict) else '?'}"
                               f" is not supported by this lmpress (expects {FORMAT_VERSION})")
    from ..nn import register_formats

    unknown = {v.get("format") for v in m.get("layers", {}).values()} - set(register_formats()) - {"dense"}
    if unknown:
        raise UnsupportedModel(f"{folder}: layers stored as {', '.join(sorted(map(str, unknown)))}, which this lmpress "
                               f"version cannot load; upgrade lmpress")
    return m
