"""Streaming: a model whose blocks stay empty until the sequential engine needs them, one at a time.

`load_streaming(source)` builds the model from its config, loads everything outside the blocks (embeddings,
final norm, output head) and leaves every block's weights on the `meta` device (no memory). `fill_block(lm, i)`
reads block i's tensors from the file (a safetensors folder: those tensors only; a GGUF file: those tensors
dequantized) into the block. The engine fills each block just before compressing it, and compressing replaces
its float linears with their compressed form, so the process holds the compressed blocks, one float block and
the calibration activations — not the float model (calibrate.run_sequential's `fill`, compress's use of it).

Data-free steps touch every layer at once: compress fills all blocks before them (the bound is then gone, and
it says so). Only models loaded from a GGUF file or a transformers folder stream; an lmpress folder is
already compressed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import BadInput, CorruptModel
from .arch import arch_for


class SafetensorsSource:
    """Tensors of a transformers folder, read by name (safetensors reads only the requested ones)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        from .hf import check_safetensors, weight_files

        self.where: dict[str, Path] = {}
        for f in weight_files(folder):
            check_safetensors(f)
            with safe_open(f, "pt") as fh:
                self.where.update({k: f for k in fh.keys()})

    def get(self, keys: set[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for f in sorted({self.where[k] for k in keys if k in self.where}):
            with safe_open(f, "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in keys if self.where.get(k) == f})
        return out

    def close(self):
        pass


class GGUFSource:
    """Tensors of a GGUF file under the model's state-dict names, dequantized on request."""

    def __init__(self, path: Path, model: torch.nn.Module):
        from . import gguf

        self.gf, self.model = gguf.read_gguf(path), model

    def get(self, keys: set[str]) -> dict[str, torch.Tensor]:
        from . import gguf

        return gguf.gguf_state_dict(self.gf, self.model, keys)

    def close(self):
        self.gf.close()


def load_streaming(source: str | Path, dtype=torch.float32):
    """A LoadedModel whose blocks are empty (meta) until fill_block; lm.stream holds the open weight source."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from . import LoadedModel, _check_loaded, _has_gguf_magic, gguf, hf, stored_weights

    t0 = time.perf_counter()
    path = Path(source)
    if not path.exists():
        raise BadInput(f"--stream reads the weights from a local file or folder; {source} does not exist")
    is_gguf = path.is_file() and (path.suffix == ".gguf" or _has_gguf_magic(path))
    if is_gguf:
        conv = gguf.converted_dir(path)
    elif (path / "config.json").exists() and not (path / "lmpress.json").exists():
        conv = path
    else:
        raise BadInput(f"--stream needs a .gguf file or a transformers folder (not a model lmpress already "
                       f"compressed): {source}")
    config = hf.load_config(conv)
    with no_init_weights():  # allocated, never touched: the blocks go to meta before any page is written
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = arch_for(config.model_type)
    blocks = spec.block_list(model)
    keep = {}  # each block's non-persistent buffers (computed at construction, not stored in files)
    for i, block in enumerate(blocks):
        persistent = set(block.state_dict())
        keep[i] = {n: b for n, b in block.named_buffers() if n not in persistent}
        block.to_empty(device="meta")
    src = GGUFSource(path, model) if is_gguf else SafetensorsSource(path)
    prefix = spec.blocks + "."
    outside = {k for k in model.state_dict() if not k.startswith(prefix)}
    state = {k: v.to(dtype) for k, v in src.get(outside).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    _check_loaded(path, model, [k for k in missing if not k.startswith(prefix)], unexpected)
    model.eval()
    size = path.stat().st_size if is_gguf else sum(f.stat().st_size for f in hf.weight_files(path))
    lm = LoadedModel(model=model, tokenizer=hf.load_tokenizer(conv), source=str(path),
                     kind="gguf" if is_gguf else "hf", disk_bytes=size, disk_params=0,
                     load_s=time.perf_counter() - t0)
    lm.disk_params = stored_weights(model)  # shapes only: meta tensors count too
    lm.stream = {"source": src, "buffers": keep, "filled": set()}
    return lm


def is_streaming(lm) -> bool:
    return getattr(lm, "stream", None) is not None


def fill_block(lm, i: int) -> None:
    """Read block i's weights from the file into the model (nothing when already there)."""
    st = lm.stream
    if i in st["filled"]:
        return
    spec = lm.arch
    block = spec.block_list(lm.model)[i]
    prefix = f"{spec.blocks}.{i}."
    dtype = next(p for p in lm.model.parameters() if p.device.type != "meta").dtype
    want = {prefix + k for k in block.state_dict()}
    state = {k[len(prefix):]: v.to(dtype) for k, v in st["source"].get(want).items()}
    missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CorruptModel(f"{lm.source}: block {i} lacks {', '.join(missing[:3]) or '-'} / has unexpected "
                           f"{', '.join(unexpected[:3]) or '-'}: the file does not match its config")
    for name, buf in st["buffers"][i].items():
        mod_path, _, attr = name.rpartition(".")
        (block.get_submodule(mod_path) if mod_path else block)._buffers[attr] = buf
    st["filled"].add(i)


def fill_all(lm) -> None:
    for i in range(len(lm.arch.block_list(lm.model))):
        fill_block(lm, i)


def close(lm) -> None:
    """Fill what is still empty and release the file: the model is then an ordinary in-memory one."""
    if is_streaming(lm):
        fill_all(lm)
        lm.stream["source"].close()
        lm.stream = None
