"""compress(model, recipe): apply each step of a recipe in order. The dispatch table is here and only here."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

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
    substitute(model, converted(model, step, convert, progress))


def converted(model: torch.nn.Module, step, convert, progress: bool = False) -> dict[int, torch.nn.Module]:
    """{id(layer): convert(layer, step)} for every layer `step` selects (a shared layer once)."""
    from .eval.report import progress_bar

    layers = select(model, step)
    new: dict[int, torch.nn.Module] = {}
    with progress_bar(len(layers), type(step).__name__, progress, unit="layer") as bar:
        for mod in layers.values():
            if id(mod) not in new:
                new[id(mod)] = convert(mod, step)
            bar.update(1)
    return new


def substitute(model: torch.nn.Module, new: dict[int, torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Put new[id(child)] in place of every child of the model found in `new`, in place; returns the inverse
    mapping (substitute(model, returned) puts the old modules back)."""
    back: dict[int, torch.nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                back[id(new[id(child)])] = child
                setattr(parent, child_name, new[id(child)])
    return back


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


def _hqq_model(lm, model, step, data, progress):
    """HQQ. start "auto": quantize with both starts and keep the model whose next-token distribution is closer
    (KLD) to the float model's on a short check text (quant/hqq.py: which start wins depends on the model)."""
    import dataclasses

    from .quant.hqq import AUTO_CHECK, check_kld

    if step.start != "auto":
        return replace_layers(model, step, _hqq, progress)
    rows = None
    if data:
        rows = [r[None] for b in data for r in b][:AUTO_CHECK[0]]
    elif hasattr(lm, "tokenizer"):
        n, length = AUTO_CHECK
        rows = [r[None] for b in calibration(lm, f"builtin:{n}x{length}") for r in b]
    if not rows:  # a bare module without text: the integer start, HQQ's classic one
        return replace_layers(model, dataclasses.replace(step, start="rtn"), _hqq, progress)
    cands = {start: converted(model, dataclasses.replace(step, start=start), _hqq, progress)
             for start in ("rtn", "minmax")}
    kld = check_kld(model, rows, cands)
    chosen = min(kld, key=kld.get)
    substitute(model, cands[chosen])
    if progress:
        print(f"lmpress: HQQ start {chosen} (check KLD: " + ", ".join(f"{k} {v:.4f}" for k, v in kld.items()) + ")",
              file=sys.stderr)
    if hasattr(lm, "info"):
        lm.info.setdefault("hqq_start", []).append({"chosen": chosen, "check_kld": kld})


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


def _sequential(lm, model, step, data, progress, algorithm, park_near=None, **engine):
    """A calibrated step through the sequential engine: `algorithm` is a module with init_stats / update_stats
    / apply (calibrate.py). engine: run_sequential's checkpoints / spill / device. A streamed model
    (models.stream) has its blocks read from disk as the engine reaches them, and those it leaves in float go
    back to disk (a temporary folder in `park_near`) once finished."""
    from .calibrate import all_targets, run_sequential
    from .memory import release_freed_memory
    from .models.arch import arch_for
    from .models.stream import embedding_loaded, fill_block, is_streaming, park_block

    # names only (the usual error when targets/ignore match no float linear layer): a dict of the modules kept
    # for the whole step would keep every float layer the engine replaces, and their weights, alive to the end
    wanted = list(select(model, step))
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
    if is_streaming(lm):
        engine["fill"] = lambda _block, i: fill_block(lm, i)
        engine["capture_context"] = lambda: embedding_loaded(lm)
        engine["release"] = lambda _block, i: park_block(lm, i, park_near)  # (a block the step left in float)
    info = run_sequential(model, spec, data, algorithm, step, progress, **engine)
    release_freed_memory()  # (the activations)
    if hasattr(lm, "info"):
        lm.info.setdefault("calibration", []).append(
            {"step": type(step).__name__,
             **{k: info[k] for k in ("seconds", "capture_s", "resumed_blocks", "peak_rss_mb")}})


def _gptq(lm, model, step, data, progress, **engine):
    from .quant import gptq

    _sequential(lm, model, step, data, progress, gptq, **engine)


def _magnitude(mod, step):
    from .prune.magnitude import prune_magnitude

    return prune_magnitude(mod, step)  # zeroes in place; returns the same module


def _wanda(lm, model, step, data, progress, **engine):
    from .prune import wanda

    _sequential(lm, model, step, data, progress, wanda, **engine)


def _sparsegpt(lm, model, step, data, progress, **engine):
    from .prune import sparsegpt

    _sequential(lm, model, step, data, progress, sparsegpt, **engine)


def _awq(lm, model, step, data, progress, **engine):
    from .quant import awq

    _sequential(lm, model, step, data, progress, awq, **engine)


def _smoothquant(lm, model, step, data, progress, **engine):
    from .quant import smoothquant

    _sequential(lm, model, step, data, progress, smoothquant, **engine)


def _qat(lm, model, step, data, progress):
    from .quant.qat import qat

    select(model, step)  # the usual error when targets/ignore match no float linear layer
    qat(model, step, tokenizer=getattr(lm, "tokenizer", None), progress=progress)  # trains under enable_grad()


def _structured(lm, model, step, data, progress):
    from .prune.structured import run_step

    run_step(lm, model, step, progress)  # calibrates on its own step.n_samples × step.seq_len windows


def _magnitude_scope(lm, model, step, data, progress):
    from .prune.gradual import magnitude_masks
    from .prune.masks import apply_mask

    layers = select(model, step)
    for name, keep in magnitude_masks(layers, step.sparsity, step.scope).items():
        apply_mask(layers[name], keep)


def _sparse_storage(mod, step):
    from .nn.sparse import SparseLinear

    w = linear_weight(mod)
    if float((w == 0).float().mean()) < step.min_sparsity:
        return mod  # not sparse enough to be worth the bitmask
    return SparseLinear.from_weight(w.to(mod.weight.dtype), mod.bias)


def _distill(lm, model, step, data, progress):
    from .distill.train import run_step

    res = run_step(lm, model, step, progress=progress)
    if hasattr(lm, "info"):
        lm.info.setdefault("distill", []).append({k: v for k, v in res.items() if k != "loss"})


# The dispatch tables. Per-layer steps: step config -> convert(layer, step). Whole-model steps (they
# calibrate, train or choose across layers): step config -> fn(lm, model, step, calibration batches or None,
# progress).
CONVERT = {R.RTN: _rtn, R.W8A8Dynamic: _int8_dynamic, R.Magnitude: _magnitude,
           R.SparseStorage: _sparse_storage}
WHOLE_MODEL = {R.HQQ: _hqq_model, R.W8A8Static: _int8_static, R.QAT: _qat, R.GPTQ: _gptq, R.Wanda: _wanda,
               R.SparseGPT: _sparsegpt, R.AWQ: _awq, R.SmoothQuant: _smoothquant, R.StructuredPrune: _structured,
               R.MagnitudeScope: _magnitude_scope, R.Distill: _distill}


DEFAULT_CALIB = "builtin:128x512"
SAMPLE_BATCH = 32  # rows sampled at once by --calib self (twice the tokens/s of 8 on CPU)


def parse_calib(spec: str) -> tuple[str, int, int]:
    """"SOURCE:NxL" → (source, N samples, L tokens each). SOURCE: builtin, self (text the model generates from
    BOS: data-free), a text file, FILE.jsonl[:FIELD] or FILE.safetensors (token ids: read_token_file); ":NxL"
    may be left out (128x512; a token file: all of it)."""
    m = re.fullmatch(r"(.+?)(?::(\d+)x(\d+))?", str(spec))
    source, n, length = m.group(1), int(m.group(2) or 128), int(m.group(3) or 512)
    if n < 1 or length < 2:
        raise BadInput(f"--calib {spec}: needs at least 1 sample of at least 2 tokens")
    if source == "wikitext2":
        raise BadInput("--calib wikitext2: the WikiText-2 test text is what lmpress evaluates on; calibrate on "
                       "builtin, self, or a text/jsonl file of your own")
    return source, n, length


def calibration(lm, spec: str = DEFAULT_CALIB, data_dir=None, seed: int = 0, batch_size: int = 8,
                progress: bool = False) -> list[torch.Tensor]:
    """Calibration batches [≤batch_size, L] of token ids for `spec` (parse_calib). Text sources give N seeded,
    non-overlapping windows of L tokens, each starting with BOS as the model's inputs do; `self` samples N
    sequences from the model itself (temperature 1, seeded). L is capped at the model's position limit."""
    from .data import load_text, tokenize
    from .quant.qat import text_batches

    source, n, length = parse_calib(spec)
    if source.endswith(TOKEN_FILE):
        sized = re.fullmatch(r".+:\d+x\d+", str(spec)) is not None
        rows = read_token_file(source, lm, *((n, length) if sized else (None, None)))
        return list(rows.split(batch_size))
    length = min(length, lm.max_positions or length)
    if source == "self":
        if getattr(lm, "stream", None) is not None:
            raise BadInput("--calib self generates text with the whole model, and --stream keeps its blocks on disk: "
                           "sample it once with `lmpress calib MODEL --calib self:NxL --out FILE.safetensors` and "
                           "pass --calib FILE.safetensors, or drop --stream")
        if lm.bos_id is None:
            raise BadInput("--calib self samples from BOS, and this tokenizer has no BOS token: use a text source")
        rows = _cached_self_samples(lm, n, length, seed, progress)  # [n, length]
        return list(rows.split(batch_size))
    ids = tokenize(lm.tokenizer, load_text(source, data_dir))
    return text_batches(ids, n, length, batch_size, seed=seed, bos=lm.bos_id)


TOKEN_FILE = ".safetensors"  # --calib FILE.safetensors: calibration token ids (write_token_file / `lmpress calib`)


def check_token_out(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where a token file may be written: a .safetensors path, not an existing file unless `overwrite`."""
    path = Path(path)
    if path.suffix != TOKEN_FILE:
        raise BadInput(f"{path}: a calibration token file is a {TOKEN_FILE} file")
    if path.exists() and not overwrite:
        raise BadInput(f"{path} already exists; choose another --out or pass --force to replace it")
    return path


def write_token_file(rows: torch.Tensor, path: str | os.PathLike, lm=None, meta: dict | None = None,
                     overwrite: bool = False) -> None:
    """Save calibration rows [N, L] of token ids as a safetensors file (tensor "ids", int64), atomically; with
    `lm`, its tokenizer's size goes in the metadata so that a model with another vocabulary refuses the file."""
    from safetensors.torch import save_file

    path = check_token_out(path, overwrite)
    meta = {k: str(v) for k, v in (meta or {}).items()}
    if lm is not None:
        meta["tokenizer_size"] = str(len(lm.tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"ids": rows.long().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_token_file(path: str | os.PathLike, lm, n: int | None = None, length: int | None = None) -> torch.Tensor:
    """Calibration rows from a token file (write_token_file; a `--calib self` cache file too): its first n rows,
    the first `length` tokens of each (all when None; length capped at the model's position limit), as int64.
    BadInput for a missing or unreadable file, no integer "ids" matrix, fewer rows or tokens than asked, or ids
    from another vocabulary (the tokenizer's size in the metadata, or an id beyond the embedding)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--calib {path}: no such token file")
    try:
        with safe_open(p, "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            ids = f.get_tensor("ids") if "ids" in keys else None
    except Exception as e:  # safetensors' own errors name no file
        raise BadInput(f"--calib {path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    if ids is None or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise BadInput(f"--calib {path}: expected an integer tensor 'ids' [samples, tokens] (what `lmpress calib` "
                       f"writes)")
    rows, cols = ids.shape
    n, length = n or rows, min(length or cols, lm.max_positions or cols)
    if n > rows or length > cols or length < 2:
        raise BadInput(f"--calib {path}: holds {rows} samples of {cols} tokens; {n}x{length} asked")
    vocab = getattr(getattr(lm.model, "config", None), "vocab_size", None) or len(lm.tokenizer)
    if "tokenizer_size" in meta and meta["tokenizer_size"] != str(len(lm.tokenizer)):
        raise BadInput(f"--calib {path}: made with a tokenizer of {meta['tokenizer_size']} tokens, and this model's "
                       f"has {len(lm.tokenizer)}: sample the file again with this model")
    ids = ids[:n, :length].long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise BadInput(f"--calib {path}: token ids outside this model's vocabulary (0..{vocab - 1}): made with "
                       f"another tokenizer?")
    return ids


def _model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes and bytes of every parameter and buffer)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cached_self_samples(lm, n: int, length: int, seed: int, progress: bool) -> torch.Tensor:
    """`--calib self` rows [n, length], sampled once per (model weights, n, length, seed) and kept in
    $LMPRESS_CACHE/calib/ as safetensors: sampling costs as much as compressing (36 min for Qwen2.5-0.5B at
    128x512 on 2 cores), and a cached draw also makes a rerun calibrate on exactly the same tokens."""
    from safetensors import safe_open

    from .models.gguf import cache_root
    from .quant.qat import sample_batches

    key = f"{_model_digest(lm.model)[:32]}-n{n}-l{length}-s{seed}-b{SAMPLE_BATCH}-bos{lm.bos_id}"
    path = cache_root() / "calib" / f"self-{key}.safetensors"
    if path.exists():
        try:
            with safe_open(path, "pt") as f:
                rows = f.get_tensor("ids")
            if rows.shape == (n, length) and rows.dtype == torch.long:
                if progress:
                    print(f"lmpress: self calibration {n}×{length} from the cache ({path})", file=sys.stderr)
                return rows
        except Exception:  # a damaged cache entry is sampled again and replaced
            pass
    if progress:
        print(f"lmpress: sampling {n}×{length} calibration tokens from the model itself", file=sys.stderr)
    rows = torch.cat(sample_batches(lm.model, n, length, SAMPLE_BATCH, lm.bos_id, seed=seed))
    try:
        write_token_file(rows, path, overwrite=True)
    except OSError as e:  # a read-only cache costs a resample next time, nothing else
        if progress:
            print(f"lmpress: could not cache the self calibration ({e})", file=sys.stderr)
    return rows


def default_calibration(lm) -> list[torch.Tensor]:
    """The calibration of a LoadedModel when none is given: DEFAULT_CALIB (the built-in corpus, never an
    evaluation text)."""
    return calibration(lm, DEFAULT_CALIB)
def _check_job(folder, lm, steps, data) -> None:
    """A checkpoint folder belongs to one job: the same source model, recipe and calibration tokens. Its
    job.json says which; another job's folder is refused rather than mixed in."""
    import hashlib
    import json

    h = hashlib.sha256()
    for b in data or []:
        h.update(b.to(torch.int64).numpy().tobytes())
    job = {"source": getattr(lm, "source", None), "recipe": [R.to_dict(s) for s in steps],
           "calibration_sha256": h.hexdigest(), "threads": torch.get_num_threads()}
    folder = Path(folder)
    path = folder / "job.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old != job:
            raise BadInput(f"the checkpoint folder {folder} belongs to another job (model, recipe, calibration data "
                           f"or thread count differ): delete it, or choose another checkpoint folder")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("job.json.tmp")
    tmp.write_text(json.dumps(job, indent=1))
    tmp.replace(path)


def round_float_leftovers(model: torch.nn.Module) -> None:
    """Round the weights a recipe left in float (embeddings, norms, a float lm_head) to fp16 values, in place,
    so that they save in half the bytes (models.io stores exactly-fp16 tensors as fp16). Tensors beyond fp16's
    range stay as they are."""
    from .models import io

    for mod in model.modules():
        if callable(getattr(mod, "lmpress_format", None)):
            continue
        for p in mod.parameters(recurse=False):
            if p.device.type != "meta":  # (a streamed model's embedding and head: rounded when read)
                io.round_to_fp16_values(p.data)


SEQUENTIAL = {R.GPTQ, R.Wanda, R.SparseGPT, R.AWQ, R.SmoothQuant}  # the steps the engine can resume
CALIBRATED = SEQUENTIAL | {R.W8A8Static}  # the steps that read calibration batches (compress's `data`)


def _convert_streamed(lm, model, step, progress: bool, near) -> None:
    """A per-layer (CONVERT) step on a streamed model, one block at a time: each block the step selects in is
    read, converted, and — when the step leaves it in float (magnitude pruning) — parked on disk again
    (models.stream.park_block), so memory stays bounded as in the engine. Layers outside the blocks (the head)
    are read and converted after."""
    from .eval.report import progress_bar
    from .memory import release_freed_memory
    from .models import stream

    prefix = lm.arch.blocks + "."
    names = list(select(model, step))  # (names only: the blocks' weights may still be on disk)
    in_block: dict[int, list[str]] = {}
    for name in names:
        if name.startswith(prefix):
            in_block.setdefault(int(name[len(prefix):].split(".", 1)[0]), []).append(name)
    with progress_bar(len(in_block), type(step).__name__, progress, unit="block") as bar:
        for i, chosen in sorted(in_block.items()):
            stream.fill_block(lm, i)
            mods = {id(m): m for m in map(model.get_submodule, chosen)}
            substitute(lm.arch.block_list(model)[i], {key: CONVERT[type(step)](m, step) for key, m in mods.items()})
            del mods
            stream.park_block(lm, i, near)
            release_freed_memory()
            bar.update(1)
    if len(names) > sum(map(len, in_block.values())):
        stream.fill_outside(lm)
        new = {id(m): CONVERT[type(step)](m, step) for n, m in select(model, step).items() if not n.startswith(prefix)}
        substitute(model, new)


def compress(lm, recipe, progress: bool = False, data: list[torch.Tensor] | None = None, round_floats: bool = True,
             checkpoint: str | None = None, spill: str | None = None, device: str | None = None,
             defer_outside: bool = False, park: str | None = None):
    """Apply `recipe` (a preset name, a YAML/JSON path, or a list of steps) to `lm` in place; returns `lm`.

    `lm` is a LoadedModel (its recipe grows by the steps applied, and is saved in the manifest) or any
    nn.Module (then the module is returned). `data`: calibration batches of token ids [B, T] for steps that
    need them (default for a LoadedModel: default_calibration, made once for all steps). `round_floats`: round
    what stays float to fp16 values (round_float_leftovers) so a LoadedModel saves small; off for a step meant
    to be function-preserving. `checkpoint`: a folder where calibrated steps save each finished block, so a
    rerun with the same recipe, model and data resumes where a killed one stopped (calibrate.py); data-free
    steps are simply redone (they are deterministic), QAT starts over. `spill`, `device`: where calibrated steps
    keep activations (a folder: file-backed) and compute (calibrate.run_sequential). A LoadedModel from
    models.stream.load_streaming is filled block by block by calibrated and per-layer steps (blocks they leave
    in float wait on disk, in a temporary folder inside `park`; default: inside `spill`, else beside
    `checkpoint`, else in the system's temporary folder), whole before a whole-model step, and is an ordinary
    in-memory model afterwards; with `defer_outside` (and round_floats) its embedding and head stay on disk
    until it first runs or is saved (models.stream.close's keep_outside: `lmpress compress --stream` never
    holds them in float32)."""
    from .calibrate import BlockCheckpoints
    from .models import stream

    steps = R.load_recipe(recipe)
    model = getattr(lm, "model", lm)
    t0 = time.perf_counter()
    needs_data = any(type(s) in CALIBRATED for s in steps)
    if data is None and needs_data and hasattr(lm, "tokenizer"):
        data = default_calibration(lm)
    if checkpoint is not None:
        _check_job(checkpoint, lm, steps, data)
    near = park or spill or (Path(checkpoint).parent if checkpoint is not None else None)  # where parked blocks go
    with torch.no_grad():
        for k, step in enumerate(steps):
            if type(step) in CONVERT and stream.is_streaming(lm):
                _convert_streamed(lm, model, step, progress, near)
                continue
            if type(step) not in SEQUENTIAL and stream.is_streaming(lm):  # a whole-model step
                if progress:
                    print(f"lmpress: {type(step).__name__} works on the whole model: reading every block from "
                          f"disk (streaming bounds memory for calibrated and per-layer steps)", file=sys.stderr)
                stream.fill_all(lm)
            if type(step) in SEQUENTIAL:
                kw = {"spill": spill, "device": device, "park_near": near}
                if checkpoint is not None:
                    kw["checkpoints"] = BlockCheckpoints(checkpoint, f"step{k}")
                WHOLE_MODEL[type(step)](lm, model, step, data, progress, **kw)
            elif type(step) in WHOLE_MODEL:
                WHOLE_MODEL[type(step)](lm, model, step, data, progress)
            else:
                replace_layers(model, step, CONVERT[type(step)], progress)
    stream.close(lm, keep_outside=defer_outside and round_floats and hasattr(lm, "recipe"))  # whole from here on
    if hasattr(lm, "recipe"):
        if round_floats:
            round_float_leftovers(model)
        lm.recipe = list(lm.recipe) + [R.to_dict(s) for s in steps]
        lm.info["compress_s"] = time.perf_counter() - t0
    return lm
