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


def round_to_fp16_values(t: torch.Tensor) -> None:
    """Round float32 `t` to fp16 values in place, in slices (no fp16 copy of a whole embedding); a tensor with a
    value beyond fp16's range stays as it is."""
    if t.dtype == torch.float32 and t.numel() and t.detach().abs().max() < 65504:
        parts = t.data.view(-1).split(1 << 22) if t.is_contiguous() else [t.data]
        for c in parts:
            c.copy_(c.half())


def exact_storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest float dtype that holds every value of float32 tensor `t` exactly (checked in slices of
    ~4M values: no full-size copies of a large embedding)."""
    flat = t.detach().reshape(-1)
    for dt in (torch.float16, torch.bfloat16):
        if all(torch.equal(c.to(dt).to(t.dtype), c) for c in flat.split(1 << 22)):
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
            if p.device.type == "meta":
                continue  # (a streamed model's embedding and head, still on disk: save writes them from there)
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
    from .stream import has_parked

    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInput(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with narrowed_floats(lm.model):
            if has_parked(lm):
                written = _save_with_parked(lm, tmp)
            else:
                lm.model.save_pretrained(tmp)
                written = {}
            manifest = build_manifest(lm, recipe)
        for key, dtype in written.items():  # the dense entries of tensors written from the file
            entry = manifest["layers"].get(key.rpartition(".")[0])
            if entry is not None and entry.get("format") == "dense":
                entry["dtype"] = str(dtype).removeprefix("torch.")
        lm.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        install_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_with_parked(lm, tmp: Path) -> dict[str, torch.dtype]:
    """The weights of a streamed model whose embedding and head (and blocks parked in float) are still on disk
    (models.stream.close with keep_outside): the resident tensors as they are (already narrowed), then the
    parked ones read one at a time (float16 when rounded) and written as they come (write_safetensors: never
    all in memory at once), with config.json and generation_config.json as save_pretrained writes them.
    Returns {key: dtype} of the tensors read."""
    from .stream import parked_tensors

    model = lm.model
    once = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - once  # second names of one tensor
    written = {}

    def tensors():
        for k, v in model.state_dict().items():
            if k not in tied and v.device.type != "meta":
                yield k, v
        for k, v in parked_tensors(lm):  # (parked: on `meta` above)
            v = v.to(exact_storage_dtype(v)) if v.dtype == torch.float32 else v
            written[k] = v.dtype
            yield k, v

    write_safetensors(tensors(), tmp / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    return written


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file from (name, tensor) pairs that come one at a time (a generator reading them from
    disk): each tensor's bytes go to a side file as it comes, then the header (which needs every offset) and
    those bytes are put together — so only one tensor need be in memory, where safetensors' save_file takes
    them all at once. The layout is the format's: 8-byte little-endian header length, the JSON header padded
    with spaces to a multiple of 8, the tensors' bytes back to back."""
    import struct

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    side = path.with_name(path.name + ".data")
    offset = 0
    try:
        with open(side, "wb") as fh:
            for name, t in tensors:
                if name in header:
                    raise ValueError(f"write_safetensors: {name} given twice")
                t = t.detach().cpu().contiguous()
                if t.dtype not in SAFETENSORS_DTYPES:
                    raise ValueError(f"write_safetensors: {name} is {t.dtype}, which lmpress does not store")
                raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8)
                fh.write(raw.numpy().data if raw.numel() else b"")
                header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [offset, offset + raw.numel()]}
                offset += raw.numel()
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(path, "wb") as out, open(side, "rb") as fh:
            out.write(struct.pack("<Q", len(head)) + head)
            shutil.copyfileobj(fh, out, 16 << 20)
    finally:
        side.unlink(missing_ok=True)


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
