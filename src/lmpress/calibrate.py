"""The sequential engine: calibrated compression one block at a time, for every family an ArchSpec describes.

    capture   run the model once on the calibration batches up to its blocks, recording what each block
              receives: block 0's hidden states [B, T, D], and every block's other arguments (position
              embeddings, attention mask — per block, since some families alternate full and sliding-window
              masks —, position ids, ...). The blocks do no work during capture: each is replaced for that one
              pass by a recorder that returns its input, and the pass stops at the last block (the final norm
              and the output head never run).
    per block observe: hooks on the block's target linears feed their inputs to `algorithm.update_stats`
              while the block runs every batch; the hooks are removed (always);
              apply:   `algorithm.apply(module, stats, config)` for each target; a returned module replaces it;
              propagate: the *compressed* block runs the batches again, and its outputs are the next block's
              inputs, so each block is calibrated on the errors of the blocks before it, as at inference.

An algorithm is any object (a module, a class, a namespace) with three pure functions; the engine knows
nothing else about it:

    init_stats(module) -> stats                      empty statistics for one linear layer
    update_stats(stats, x: Tensor [..., I]) -> stats  fold in a batch of the layer's inputs (in place or new)
    apply(module, stats, config) -> nn.Module         the compressed layer (or the same module, changed or not);
                                                      it may use stats' memory (GPTQ and SparseGPT build the
                                                      Hessian there): the engine hands each layer's stats over
                                                      once, a caller applying twice passes a copy

and, optionally, a fourth for work across the layers of a block (AWQ and SmoothQuant fold scales into the op
before a group of linears), called once per block between observing and applying:

    prepare_block(block, spec, stats: {path in block: stats}, config) -> stats   changes the float block in
                                                      place and returns the statistics of its layers' new
                                                      inputs; the block must compute the same function
                                                      (checked on calibration batch 0)

Targets are the block's linears as ArchSpec.linears names them, filtered by the config's `targets` and
`ignore` regexes (re.search on the full qualified name, e.g. "model.layers.3.mlp.down_proj") and restricted to
float linears (a layer an earlier step converted is left alone).

Resuming: given a BlockCheckpoints, the engine writes after each block its state (the compressed layers with
their formats, every other tensor of the block) and the hidden states it produced; a rerun with the same
folder loads the finished blocks and the last hidden states instead of recomputing them and goes on from the
next block. On the same machine and thread count the result is bit-identical to an uninterrupted run (the
same inputs reach the same deterministic computation). Files are written atomically (temporary name, then
rename), so a kill at any moment leaves either the previous or the new checkpoint.

Memory: the model's blocks may be streamed from disk (`fill`, models/stream.py), so the process holds the
compressed blocks, one float block, the activations of all calibration batches at one block boundary
(N·T·D floats; `spill` puts them in file-backed memory the OS can page out), one block's statistics and
the intermediates of one slice of a batch (`slice_tokens`) going through the block. The engine has glibc
serve tensors of 16 MB or more with their own mappings from then on, for the whole process
(`memory.map_large_allocations`): freed slices go back to the OS instead of staying in the heap.
`device` runs each block's work on an accelerator (the block moves there and back); on this project's
CPU-only machines that path is exercised with device="cpu" only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import BadInput, LmpressError
from .memory import map_large_allocations, release_freed_memory
from .nn import is_float_linear


class _StopForward(Exception):
    """Raised by the last block's recorder: the capture pass has what it needs."""


@dataclass
class Captured:
    """What the blocks receive, per calibration batch.

    hidden[b]: block 0's input hidden states for batch b, [B, T, D] (the engine overwrites it with each
    block's output as it goes). calls[b][i]: the other positional arguments and the keyword arguments block i
    received for batch b (tensors shared between blocks are stored once: the same objects)."""

    hidden: list[Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)


def _no_cache(x):
    """A KV cache object is replaced by None: re-running a block must not append to a cache."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return x
    return None if isinstance(x, Cache) else x


def _check_batches(batches) -> list[Tensor]:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise BadInput("the sequential engine needs calibration batches: a non-empty list of token ids [B, T]")
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.is_floating_point() or b.numel() == 0:
            raise BadInput(f"calibration batch {i} must be a non-empty integer tensor of token ids [B, T]; got "
                           f"{type(b).__name__} {getattr(b, 'dtype', '')} {tuple(getattr(b, 'shape', ()))}")
    return batches


def capture_block_inputs(model: torch.nn.Module, spec, batches: list[Tensor]) -> Captured:
    """Run `model` on each batch up to its blocks and return what each block receives (see Captured).

    The model is put in eval mode and restored; each block's forward is replaced by a recorder only for the
    duration of this call."""
    blocks = spec.block_list(model)
    if len(blocks) == 0:
        raise BadInput(f"{type(model).__name__} has no blocks at '{spec.blocks}'")
    batches = _check_batches(batches)
    device = next(model.parameters()).device
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    cap = Captured()
    calls: dict[int, tuple[tuple, dict]] = {}

    def recorder(i: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(_no_cache(a) for a in args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            calls[i] = (rest, {k: _no_cache(v) for k, v in kwargs.items()})
            if i == 0:
                cap.hidden.append(hidden)
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden  # identity: the blocks do no work during capture
        return forward

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for i, block in enumerate(blocks):
            block.forward = recorder(i)  # an instance attribute shadows the class's forward
        for ids in batches:
            calls.clear()
            try:
                model(ids.to(device), **kw)
            except _StopForward:
                pass
            if len(calls) != len(blocks):
                raise BadInput(f"capturing block inputs: the model called {len(calls)} of its {len(blocks)} "
                               f"blocks; the engine needs every block at '{spec.blocks}' on the forward path")
            cap.calls.append([calls[i] for i in range(len(blocks))])
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        for m, training in modes.items():
            m.training = training
    return cap


def _run_block(block: torch.nn.Module, hidden: Tensor, call: tuple[tuple, dict]) -> Tensor:
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out  # transformers 5.x blocks return the tensor


def block_targets(spec, block: torch.nn.Module, index: int, config) -> dict[str, tuple[str, torch.nn.Module]]:
    """{full qualified name: (path inside the block, module)} of the float linears of block `index` that
    config's targets/ignore select."""
    targets, ignore = getattr(config, "targets", None), getattr(config, "ignore", None)
    out = {}
    for path, mod in spec.linears(block).items():
        name = f"{spec.blocks}.{index}.{path}"
        if not is_float_linear(mod):
            continue
        if targets is not None and not re.search(targets, name):
            continue
        if ignore is not None and re.search(ignore, name):
            continue
        out[name] = (path, mod)
    return out


def all_targets(model: torch.nn.Module, spec, config) -> dict[str, torch.nn.Module]:
    """{full qualified name: module} of every block linear run_sequential would compress with `config` (for
    a caller to check, before running, that a step's selection is what the engine covers)."""
    return {name: mod for i, block in enumerate(spec.block_list(model))
            for name, (_path, mod) in block_targets(spec, block, i, config).items()}


def _replace(block: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, child, new)


class BlockCheckpoints:
    """One sequential step's per-block checkpoints in `folder`, file names prefixed by `tag`:

        {tag}-block{i:04d}.safetensors   block i's state after compression; metadata "formats" (JSON: path in
                                         the block → the lmpress format entry of each converted layer) and
                                         "layers" (the qualified names the step compressed in it)
        {tag}-hidden.safetensors         the hidden states block `after` produced, one tensor per batch
                                         ("h0", "h1", ...); metadata "after", "batches"
    """

    def __init__(self, folder: str | os.PathLike, tag: str):
        self.folder, self.tag = Path(folder), tag
        self.folder.mkdir(parents=True, exist_ok=True)

    def _block_file(self, i: int) -> Path:
        return self.folder / f"{self.tag}-block{i:04d}.safetensors"

    @property
    def _hidden_file(self) -> Path:
        return self.folder / f"{self.tag}-hidden.safetensors"

    def _write(self, path: Path, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)

    def _read(self, path: Path) -> tuple[dict, dict]:
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:  # a damaged checkpoint: say which and how to start over
            raise BadInput(f"checkpoint {path} cannot be read ({str(e).splitlines()[0][:80]}); delete "
                           f"{self.folder} to start over") from None

    def blocks_done(self, n_blocks: int) -> int:
        """How many leading blocks are finished and can be loaded (their hidden states included)."""
        if all(self._block_file(i).exists() for i in range(n_blocks)):
            return n_blocks
        if not self._hidden_file.exists():
            return 0
        from safetensors import safe_open

        with safe_open(self._hidden_file, "pt") as f:
            after = int((f.metadata() or {}).get("after", -1))
        return after + 1 if all(self._block_file(i).exists() for i in range(after + 1)) else 0

    def save(self, block: torch.nn.Module, i: int, layers: list[str], hidden: list[Tensor], last: bool) -> None:
        formats = {path: mod.lmpress_format() for path, mod in block.named_modules()
                   if callable(getattr(mod, "lmpress_format", None))}
        state = {k: v.detach().clone() for k, v in block.state_dict().items()}  # clone: tied views save once
        self._write(self._block_file(i), state, {"formats": json.dumps(formats), "layers": json.dumps(layers)})
        if not last:  # the last block's outputs feed no further block
            self._write(self._hidden_file, {f"h{b}": h for b, h in enumerate(hidden)},
                        {"after": str(i), "batches": str(len(hidden))})

    def load_block(self, block: torch.nn.Module, i: int) -> list[str]:
        """Put block i's saved state (converted layers rebuilt in their formats) into `block`; returns the
        names of the layers the step compressed in it."""
        from .nn import build_module

        state, meta = self._read(self._block_file(i))
        for path, entry in json.loads(meta.get("formats", "{}")).items():
            _replace(block, path, build_module(entry))
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise BadInput(f"checkpoint {self._block_file(i)} does not match the model's block {i}; delete "
                           f"{self.folder} to start over")
        return json.loads(meta.get("layers", "[]"))

    def load_hidden(self, n_batches: int) -> list[Tensor]:
        tensors, meta = self._read(self._hidden_file)
        if int(meta.get("batches", -1)) != n_batches:
            raise BadInput(f"checkpoint {self._hidden_file} holds {meta.get('batches')} calibration batches, not "
                           f"{n_batches}: delete {self.folder} to start over")
        return [tensors[f"h{b}"] for b in range(n_batches)]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB: VmHWM from /proc/self/status where there is one (the
    high-water mark of this process's own memory), else ru_maxrss (KiB on Linux, bytes on macOS). ru_maxrss is not
    used on Linux because a child keeps its parent's peak across fork and exec: `lmpress compress` started by a
    benchmark holding a 2 GB model reported ≥ 2 GB whatever it used itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_sequential(lm_or_model, spec, batches: list[Tensor], algorithm, config, progress: bool = False,
                   checkpoints: BlockCheckpoints | None = None, fill=None, spill: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, capture_context=None,
                   slice_tokens: int | None = 1024, release=None) -> dict:
    """Compress the block linears of `lm_or_model` (a LoadedModel or an nn.Module) in place, block by block.

    spec: the model's ArchSpec. batches: calibration token ids, a list of [B, T] tensors. algorithm: an
    object with init_stats / update_stats / apply (module docstring). config: the step config, passed to
    apply as is; its `targets` and `ignore` (when present) select the layers. checkpoints: where to save
    each finished block and resume from (module docstring); None keeps everything in memory. fill(block,
    index): called before block `index` is first used, to read its weights from disk (models.stream: the
    blocks of a streamed model are empty until then). release(block, index): called once block `index` is
    finished (and checkpointed; a resumed one once loaded), to let it go from memory (models.stream.park_block:
    a streamed block the step left in float goes to disk until needed again). spill: a folder where the
    activations live in file-backed memory (the OS pages them out under memory pressure) instead of anonymous
    RAM. device: where each block computes ("cuda" when present): the block and its batches move there for the
    block's work and the block comes back to the CPU after. capture_context: a function returning a context
    manager that holds for the capture of block 0's inputs (models.stream.embedding_loaded: a streamed model's
    token embedding is read for it and released after). slice_tokens: each batch goes through a block in
    slices of at most this many tokens (whole sequences; None: whole batches): the block's intermediate
    activations stay small whatever the batch size (Qwen2.5-0.5B's MLP at 8×512 tokens: 326 MB; at 2×512: ~80 MB).

    Returns {"layers": [names compressed], "blocks": n, "capture_s", "block_s": [seconds per block],
    "seconds", "resumed_blocks": blocks loaded from checkpoints, "peak_rss_mb": peak resident memory of the
    process (it includes everything the process held before; compare with a run without compression)}.
    Raises BadInput for no batches, a selection that matches no layer (before any work), non-finite
    activations (naming the block) or an algorithm error (prefixed with the layer's name)."""
    from .eval.report import progress_bar

    # a LoadedModel holds the module; an nn.Module is the model itself (a CausalLM's own `.model` is its body)
    model = lm_or_model if isinstance(lm_or_model, torch.nn.Module) else lm_or_model.model
    t0 = time.perf_counter()
    blocks = spec.block_list(model)
    if not all_targets(model, spec, config):
        raise BadInput(f"{type(config).__name__}: targets={getattr(config, 'targets', None)!r} "
                       f"ignore={getattr(config, 'ignore', None)!r} match no float linear layer in the blocks "
                       f"of this {type(model).__name__}")
    # by name, not by module: a dict keyed by the modules would keep every replaced float layer (its weights)
    # alive to the end — the whole float model, block by block (streamed Qwen2.5-0.5B: 3.5 GB peak instead of ~1.5)
    modes = {name: m.training for name, m in model.named_modules()}
    map_large_allocations()  # freed slice intermediates go back to the OS instead of staying in the heap
    done: list[str] = []
    block_s: list[float] = []
    resumed = checkpoints.blocks_done(len(blocks)) if checkpoints is not None else 0
    for i in range(resumed):
        if fill is not None:
            fill(blocks[i], i)  # the block's non-persistent parts; its saved state then replaces the weights
        done += checkpoints.load_block(blocks[i], i)
        if release is not None:
            release(blocks[i], i)
    if resumed and progress:
        print(f"lmpress: {type(config).__name__}: resuming after block {resumed} of {len(blocks)} from "
              f"{checkpoints.folder}", file=sys.stderr)
    capture_s = 0.0
    with torch.no_grad():  # not inference_mode: the new modules' buffers must stay ordinary tensors
        if resumed < len(blocks):
            with (capture_context or contextlib.nullcontext)():
                cap = capture_block_inputs(model, spec, batches)  # the blocks' other arguments (masks, positions)
            if resumed:
                cap.hidden = checkpoints.load_hidden(len(cap.hidden))
            if spill is not None:
                cap.hidden = [_file_backed(h, Path(spill) / f"hidden-{b}.bin") for b, h in enumerate(cap.hidden)]
            capture_s = time.perf_counter() - t0
            release_freed_memory()
        try:
            model.eval()
            with progress_bar(len(blocks) - resumed, type(config).__name__, progress, unit="block") as bar:
                for i in range(resumed, len(blocks)):
                    tb = time.perf_counter()
                    if fill is not None:
                        fill(blocks[i], i)
                        release_freed_memory()  # (the reader's temporaries)
                    if device is not None:
                        blocks[i].to(device)
                    names = _compress_block(blocks[i], i, spec, cap, algorithm, config, device, slice_tokens)
                    if device is not None:
                        blocks[i].to("cpu")
                    done += names
                    if checkpoints is not None:
                        checkpoints.save(blocks[i], i, names, cap.hidden, last=i == len(blocks) - 1)
                    if release is not None:
                        release(blocks[i], i)
                    block_s.append(time.perf_counter() - tb)
                    bar.update(1)
        finally:
            for name, m in model.named_modules():  # a replacement takes its predecessor's flag
                m.training = modes.get(name, modes[""])
    return {"layers": done, "blocks": len(blocks), "capture_s": capture_s, "block_s": block_s,
            "resumed_blocks": resumed, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def _file_backed(h: Tensor, path: Path) -> Tensor:
    """A copy of `h` whose memory is the file at `path` (mapped shared: written back, pageable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(h.numel() * h.element_size())
    out = torch.from_file(str(path), shared=True, size=h.numel(), dtype=h.dtype).view(h.shape)
    out.copy_(h)
    return out


def _to(x, device):
    """Tensors inside tuples, lists and dicts moved to `device` (a block's call arguments)."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _prepare_block(block, index: int, spec, run, algorithm, config, targets, seen, stats, ref) -> None:
    """Cross-layer work before the per-layer apply (AWQ, SmoothQuant fold scales into the op before a group
    of linears): algorithm.prepare_block(block, spec, {path in block: stats}, config) changes the float block
    in place and returns the statistics of its new inputs. It must leave the block's function unchanged:
    checked on calibration batch 0, so a family whose ArchSpec norm is not the op feeding its projections
    (a post-norm) fails here, naming the block, instead of leaving a silently different model."""
    where = f"{spec.blocks}.{index}"
    by_path = {targets[name][0]: name for name in seen.values()}
    try:
        new = algorithm.prepare_block(block, spec, {p: stats[n] for p, n in by_path.items()}, config)
    except LmpressError as e:
        raise type(e)(f"{where}: {e}") from None
    stats.update({by_path[p]: st for p, st in new.items()})
    out = run(0)  # batch 0 through the rescaled block
    diff, norm = torch.linalg.vector_norm((out - ref).float()), torch.linalg.vector_norm(ref.float())
    err = float(diff / norm.clamp_min(1e-30))
    if not err <= max(1e-3, 10 * torch.finfo(out.dtype).eps):
        raise BadInput(f"{where}: {type(config).__name__}'s rescaling changed the block's output (relative error "
                       f"{err:.1e}); the ArchSpec's attn_norm/mlp_norm of this family must be the ops that feed "
                       f"its projections")


def _row_slices(rows: int, length: int, slice_tokens: int | None) -> list[slice]:
    """Consecutive slices of a batch's `rows` sequences, each of at most `slice_tokens` tokens (at least one
    sequence); one slice for all when slice_tokens is None."""
    step = rows if not slice_tokens else max(1, slice_tokens // max(length, 1))
    return [slice(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _rows_of(x, rows: slice, n: int):
    """A block call's arguments for the sequences `rows` of a batch of n: tensors whose first dimension is
    the batch's (n > 1) are sliced, the others (broadcast masks, [1, T, d] position embeddings) kept."""
    if isinstance(x, Tensor):
        return x[rows] if n > 1 and x.dim() >= 1 and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(_rows_of(v, rows, n) for v in x)
    if isinstance(x, dict):
        return {k: _rows_of(v, rows, n) for k, v in x.items()}
    return x


def _compress_block(block, index: int, spec, cap: Captured, algorithm, config, device=None,
                    slice_tokens: int | None = None) -> list[str]:
    """Observe, apply and propagate one block; cap.hidden becomes the next block's inputs (written in place,
    so file-backed activations stay file-backed). device: where the block is; batches move there.
    slice_tokens: each batch goes through the block in slices of at most this many tokens (whole sequences),
    which bounds the block's intermediate activations (the MLP's [tokens, intermediate] tensors) whatever the
    calibration batch size; the statistics sum the same rows in another order."""
    def run(b, into: Tensor | None = None) -> Tensor | None:
        """Batch b through the block, slice by slice: the output, or (into given) each slice checked finite
        and written to its rows of `into`."""
        hidden, call = cap.hidden[b], cap.calls[b][index]
        n, parts = hidden.shape[0], []
        for rows in _row_slices(n, hidden.shape[1] if hidden.dim() > 1 else 1, slice_tokens):
            h, c = (hidden, call) if rows == slice(0, n) else (hidden[rows], _rows_of(call, rows, n))
            out = _run_block(block, h, c) if device is None else _run_block(block, h.to(device), _to(c, device))
            if into is None:
                parts.append(out)
                continue
            if not torch.isfinite(out).all():
                raise BadInput(f"block {index} ({spec.blocks}.{index}) produced inf or NaN activations on "
                               f"calibration batch {b}" + (" after compression" if targets else ""))
            into[rows].copy_(out)
        return None if into is not None else parts[0] if len(parts) == 1 else torch.cat(parts)

    targets = block_targets(spec, block, index, config)
    if targets:
        # observe: one hook per distinct module (a module under two names is observed and replaced once)
        stats, handles = {}, []

        def hook_for(name):
            def hook(_module, args, kwargs, _output):
                x = args[0] if args else kwargs["input"]  # [..., I]
                new = algorithm.update_stats(stats[name], x)
                if new is not None:
                    stats[name] = new
            return hook

        seen = {}
        for name, (_path, mod) in targets.items():
            if id(mod) not in seen:
                seen[id(mod)] = name
                stats[name] = algorithm.init_stats(mod)
        try:
            for name in seen.values():
                handles.append(targets[name][1].register_forward_hook(hook_for(name), with_kwargs=True))
            for b in range(len(cap.hidden)):
                out = run(b)
                if b == 0:
                    ref = out  # the float block's output on batch 0: prepare_block must not change it
        finally:
            for h in handles:
                h.remove()
        release_freed_memory()
        if hasattr(algorithm, "prepare_block"):
            _prepare_block(block, index, spec, run, algorithm, config, targets, seen, stats, ref)
        # apply, then swap the replacements in
        new_by_id = {}
        for mid, name in seen.items():
            mod = targets[name][1]
            try:
                new_by_id[mid] = algorithm.apply(mod, stats.pop(name), config)
            except LmpressError as e:
                raise type(e)(f"{name}: {e}") from None
            release_freed_memory()
        for name, (path, mod) in targets.items():
            new = new_by_id[id(mod)]
            if new is not None and new is not mod:
                _replace(block, path, new)
    # propagate through the compressed block
    for b in range(len(cap.hidden)):
        run(b, into=cap.hidden[b])  # slices in place: a block treats the sequences of a batch independently
    release_freed_memory()
    return list(targets)
