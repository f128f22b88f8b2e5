"""Streaming: a model whose blocks stay empty until the sequential engine needs them, one at a time.

`load_streaming(source)` builds the model from its config, loads the small tensors outside the blocks (final
norm, biases) and leaves every block's weights, the token embedding and the output head on the `meta` device (no
memory). `fill_block(lm, i)` reads block i's tensors from the file (a safetensors folder: those tensors only; a
GGUF file: those tensors dequantized) into the block. The engine fills each block just before compressing it,
and compressing replaces its float linears with their compressed form, so the process holds the compressed
blocks, one float block and the calibration activations — not the float model (calibrate.run_sequential's
`fill`, compress's use of it). The embedding is read only for the capture of block 0's inputs and released
after (`embedding_loaded`); embedding and head come back when the model is closed. For Qwen2.5-0.5B they are
1.09 GB of its 2.5 GB in float32.

A step that leaves a finished block in float (Wanda, SparseGPT, SmoothQuant, magnitude: zeroed or rescaled
weights, still float32) would hold the whole float model by its last block. `park_block` writes such a block's
exact tensors to a spill folder and frees it; fill_block reads it back when a later step needs it, and
models.io.save writes it from there one block at a time (`parked_tensors`).

Per-layer data-free steps (compress.CONVERT: RTN, W8A8 dynamic, magnitude) go block by block the same way
(compress._convert_streamed); whole-model steps that touch the blocks (HQQ, QAT, …) need every block: compress
fills them all first (the bound is then gone, and it says so). Only models loaded from a GGUF file or a
transformers folder stream; an lmpress folder is already compressed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
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

    def get(self, keys: set[str], half: bool = False) -> dict[str, torch.Tensor]:
        """half: float tensors rounded to float16 (GGUFSource.get)."""
        from safetensors import safe_open

        out = {}
        for f in sorted({self.where[k] for k in keys if k in self.where}):
            with safe_open(f, "pt") as fh:
                for k in keys:
                    if self.where.get(k) == f:
                        t = fh.get_tensor(k)
                        out[k] = t.half() if half and t.is_floating_point() else t
        return out

    def close(self):
        pass


class GGUFSource:
    """Tensors of a GGUF file under the model's state-dict names, dequantized on request."""

    def __init__(self, path: Path, model: torch.nn.Module):
        from . import gguf

        self.gf, self.model = gguf.read_gguf(path), model

    def get(self, keys: set[str], half: bool = False) -> dict[str, torch.Tensor]:
        """half: dequantized straight to float16, slice by slice (no float32 copy of a large tensor)."""
        import numpy as np

        from . import gguf

        out = gguf.gguf_state_dict(self.gf, self.model, keys, np.float16 if half else np.float32)
        self.gf.drop_pages()  # the tensors are dequantized copies: the file's pages can leave the process
        return out

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
    parked = _param_keys(model, _ends(model))
    for mod in _ends(model):
        mod.to_empty(device="meta")
    src = GGUFSource(path, model) if is_gguf else SafetensorsSource(path)
    prefix = spec.blocks + "."
    outside = {k for k in model.state_dict() if not k.startswith(prefix)} - parked
    state = {k: v.to(dtype) for k, v in src.get(outside).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    _check_loaded(path, model, [k for k in missing if not k.startswith(prefix) and k not in parked], unexpected)
    model.eval()
    size = path.stat().st_size if is_gguf else sum(f.stat().st_size for f in hf.weight_files(path))
    lm = LoadedModel(model=model, tokenizer=hf.load_tokenizer(conv), source=str(path),
                     kind="gguf" if is_gguf else "hf", disk_bytes=size, disk_params=0,
                     load_s=time.perf_counter() - t0)
    lm.disk_params = stored_weights(model)  # shapes only: meta tensors count too
    lm.stream = {"source": src, "buffers": keep, "filled": set(), "parked": parked, "spilled": {}}
    return lm


def park_block(lm, i: int, folder: str | Path | None = None) -> bool:
    """Write finished block i to a spill folder (a temporary folder inside `folder`, made at the first call;
    the system's temporary folder when None) and free its tensors; True when parked. Only a block of plain
    float modules is parked: a compressed one is already small. fill_block reads it back, exactly."""
    from safetensors.torch import save_file

    from ..memory import release_freed_memory

    st = lm.stream
    block = lm.arch.block_list(lm.model)[i]
    if i not in st["filled"] or any(callable(getattr(m, "lmpress_format", None)) for m in block.modules()):
        return False
    if "spill_dir" not in st:
        import tempfile

        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        st["spill_dir"] = tempfile.TemporaryDirectory(prefix=".lmpress-blocks-", dir=folder)  # gone with lm.stream
    path = Path(st["spill_dir"].name) / f"block-{i:04d}.safetensors"
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(path))
    block.to_empty(device="meta")
    st["filled"].discard(i)
    st["spilled"][i] = path
    release_freed_memory()
    return True


def _read_spilled(lm, i: int, half: bool = False) -> dict[str, torch.Tensor]:
    """Block i's tensors from its spill file (keys relative to the block); float parameters rounded to fp16
    values when compress rounded the float leftovers while the block was on disk (float16 with `half` when
    every value fits)."""
    from safetensors.torch import load_file

    from .io import round_to_fp16_values

    state = load_file(str(lm.stream["spilled"][i]))
    if lm.stream.get("round_floats"):
        params = {n for n, _ in lm.arch.block_list(lm.model)[i].named_parameters()}
        for k in params & set(state):
            t = state[k]
            if half and t.dtype == torch.float32 and t.numel() and float(t.abs().max()) < 65504:
                state[k] = t.half()
            else:
                round_to_fp16_values(t)
    return state


def _ends(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The token embedding and the output head (one module when they are the same)."""
    mods = {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return list(mods.values())


def _param_keys(model: torch.nn.Module, mods) -> set[str]:
    """State-dict keys of these modules' own parameters, under every name (a tied tensor has two)."""
    ids = {id(p) for m in mods for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def _fill_keys(lm, keys: set[str]) -> None:
    """Read these parked state-dict keys from the file into the model (those already there are skipped)."""
    model, st = lm.model, lm.stream
    want = keys & st["parked"]
    if not want:
        return
    dtype = next(p for p in model.parameters() if p.device.type != "meta").dtype
    state = {k: v.to(dtype) for k, v in st["source"].get(want).items()}
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    from . import _check_loaded

    _check_loaded(lm.source, model, sorted(want - set(state)), unexpected)  # (ties the head when it is tied)
    st["parked"] -= want
    if st.get("round_floats"):  # compress rounded the float leftovers while these were on disk: as it would have
        from .io import round_to_fp16_values

        for k in state:
            round_to_fp16_values(model.get_parameter(k).data)


def fill_outside(lm) -> None:
    """Read the token embedding and the output head (nothing when already there)."""
    if is_streaming(lm):
        _fill_keys(lm, set(lm.stream["parked"]))


@contextmanager
def embedding_loaded(lm):
    """The token embedding read for the duration (the capture of block 0's inputs), released after unless it
    was there before. A head tied to it comes and goes with it."""
    model = lm.model
    emb = model.get_input_embeddings()
    keys = _param_keys(model, [emb])
    was_parked = keys & lm.stream["parked"]
    _fill_keys(lm, keys)
    try:
        yield
    finally:
        if was_parked:
            for mod in _ends(model):  # every module holding the tensor (a tied head too) lets it go
                if _param_keys(model, [mod]) & was_parked:
                    mod.to_empty(device="meta")
            lm.stream["parked"] |= was_parked


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
    if i in st["spilled"]:
        state = _read_spilled(lm, i)  # (exact: what the block held when parked)
        st["spilled"].pop(i).unlink()  # a later step changes the block: the file would be stale
    else:
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
    """Every block, the embedding and the head: the whole model in memory (a step that needs all of it)."""
    for i in range(len(lm.arch.block_list(lm.model))):
        fill_block(lm, i)
    fill_outside(lm)


def close(lm, keep_outside: bool = False) -> None:
    """Fill what is still empty and release the file: the model is then an ordinary in-memory one.

    keep_outside: the embedding and the head stay on disk until the model first runs (a forward pre-hook reads
    them) or models.io.save writes them straight from the file, one at a time in float16 — so saving a
    streamed compression never holds them in float32 (1.09 GB for Qwen2.5-0.5B). It also marks them to be
    rounded to fp16 values when read, as compress rounds every float leftover."""
    if not is_streaming(lm):
        return
    st = lm.stream
    for i in range(len(lm.arch.block_list(lm.model))):
        if not (keep_outside and i in st["spilled"]):
            fill_block(lm, i)
    for h in st.pop("hooks", []):
        h.remove()
    if keep_outside and has_parked(lm):
        st["round_floats"] = True
        st["hooks"] = [m.register_forward_pre_hook(lambda _m, _a: close(lm)) for m in _ends(lm.model)]
        return
    fill_outside(lm)
    st["source"].close()
    if "spill_dir" in st:
        st.pop("spill_dir").cleanup()
    lm.stream = None


def has_parked(lm) -> bool:
    """Whether tensors of this model are still on disk (the embedding, the head, parked blocks)."""
    st = getattr(lm, "stream", None)
    return st is not None and bool(st["parked"] or st["spilled"])


def parked_tensors(lm):
    """(state-dict key, tensor) for each tensor still on disk, read one at a time (a parked block's at once):
    float16 (rounded, as compress rounds float leftovers) when the model was closed with keep_outside and its
    values fit fp16, else as `fill_outside` / `fill_block` would give it. Tied names come once (under the first
    name). For models.io.save."""
    from ..memory import release_freed_memory
    from .io import round_to_fp16_values

    st = lm.stream
    for i in sorted(st["spilled"]):
        release_freed_memory()
        prefix = f"{lm.arch.blocks}.{i}."
        yield from ((prefix + k, t) for k, t in _read_spilled(lm, i, half=True).items())
    done = set()
    for k in sorted(st["parked"]):
        p = lm.model.get_parameter(k)
        if id(p) in done:
            continue
        done.add(id(p))
        release_freed_memory()  # (the previous tensor's reading temporaries)
        if st.get("round_floats"):
            h = st["source"].get({k}, half=True).get(k)
            # every value within fp16's range (NaN and inf fail too): what rounding the float32 tensor gives
            if h is not None and h.is_floating_point() and all(float(c.abs().max()) < 65504
                                                               for c in h.view(-1).split(1 << 22)):
                yield k, h
                continue
        t = st["source"].get({k}).get(k)
        if t is None:
            continue  # a tied head the file does not store
        t = t.to(p.dtype)
        if st.get("round_floats"):
            round_to_fp16_values(t)
        yield k, t
