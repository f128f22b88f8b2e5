"""The distillation loop: one function, `distill(student, teacher, batches, cfg)`, configured by recipe.Distill.

Per optimizer step: `grad_accum` micro-batches [B, T] drawn in a seeded order (reshuffled every pass), each
loss = kl_weight · KL + hidden_weight · hidden MSE + ce_weight · CE (losses.py) divided by grad_accum; then
gradients clipped to `clip`, the optimizer step at lr(step) = linear warm-up over warmup·steps, then cosine to
0, and the masks of sparse layers re-applied (prune/gradual.MaskSchedule: fixed zeros, or gradual pruning).

Every parameter of the student trains (and the hidden-state projections, discarded afterwards); the teacher
runs in eval mode without gradients, or not at all when its top-k logits are cached (`teacher_topk`). The
student runs in eval mode too (no dropout): this is fitting a teacher, not regularised pretraining, and it
keeps the run deterministic. Gradient checkpointing recomputes each block in the backward pass
(torch.utils.checkpoint around every block's forward, found through the ArchSpec), trading time for memory.
bf16 autocast only on CUDA (amp=True); CPU trains in float32.

Checkpoints (cfg.checkpoint_dir, every cfg.checkpoint_every steps and at the end), written atomically (a
temporary folder renamed over the previous one): `state.safetensors` (student and projection parameters,
optimizer tensors, masks, the data-order generator's state) and `state.json` (step, the remaining data order,
loss history, optimizer hyper-parameters, the config). No pickle anywhere. Resuming restores all of it, so a
run interrupted and resumed on the same machine and thread count gives bit-identical weights to an
uninterrupted one (tests check this); a checkpoint written under a different config is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BadInput, CorruptModel
from . import losses

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
RESUME_IGNORES = ("checkpoint_every", "checkpoint_dir", "eval_every", "device", "cache")


# ------------------------------------------------------------------------------------------------ data

def load_training_text(source: str, data_dir=None) -> str:
    """Text to train on: builtin, wikitext2-train (wiki.train.raw in the data folder), or a file. The
    WikiText-2 test text is refused: it is what the evaluations measure."""
    from ..data import data_dir as find_dir
    from ..data import load_text

    if source == "wikitext2":
        raise BadInput("distillation data 'wikitext2' is the WikiText-2 test text used for evaluation: use builtin, "
                       "wikitext2-train or a file of your own")
    if source == "wikitext2-train":
        root = find_dir(data_dir)
        for cand in ([root / "wikitext-2-raw-v1" / "wiki.train.raw", root / "wiki.train.raw"] if root else []):
            if cand.exists():
                return cand.read_text(encoding="utf-8")
        raise BadInput("wikitext2-train: no wiki.train.raw under --data-dir / $LMPRESS_DATA (wikitext-2-raw-v1/); "
                       "use --data builtin or a text file")
    return load_text(source, data_dir)


def training_batches(tokenizer, cfg, bos: int | None, text: str | None = None,
                     data_dir=None) -> tuple[list[Tensor], list[Tensor]]:
    """(train, eval) batches [batch_size, seq_len] of non-overlapping seeded windows of the text (BOS first
    when the model has one); the eval windows are disjoint from the training ones."""
    from ..data import calibration_windows, tokenize

    ids = tokenize(tokenizer, text if text is not None else load_training_text(cfg.data, data_dir))
    body = cfg.seq_len - (bos is not None)
    wins = calibration_windows(ids, cfg.n_samples + cfg.eval_samples, body, cfg.seed)
    perm = torch.randperm(len(wins), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    rows = [w.ids if bos is None else torch.cat([torch.tensor([bos]), w.ids]) for w in (wins[i] for i in perm)]
    train, held = rows[:cfg.n_samples], rows[cfg.n_samples:]

    def cut(rs):
        return [torch.stack(rs[i:i + cfg.batch_size]) for i in range(0, len(rs), cfg.batch_size)]
    return cut(train), cut(held)


# ------------------------------------------------------------------------------------------------ teacher cache

def _batches_digest(batches: list[Tensor], k: int) -> str:
    h = hashlib.sha256(f"k={k};".encode())
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module | None, batches: list[Tensor], k: int, path: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", progress: bool = False) -> list[tuple[Tensor, Tensor]]:
    """The teacher's top-k logits for every batch: [(values float32 [B, T, k], indices int32 [B, T, k])].
    With `path`, read from that safetensors file when it holds exactly these batches and k (checked by a
    digest), else computed once and written there atomically."""
    from safetensors.torch import load_file, save_file

    digest = _batches_digest(batches, k)
    if path is not None and Path(path).exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("digest") == digest:
            t = load_file(str(path))
            return [(t[f"values.{i}"], t[f"indices.{i}"]) for i in range(len(batches))]
    if teacher is None:
        raise BadInput("the teacher's top-k cache does not match these batches and no teacher was given")
    out = []
    bar = _bar(len(batches), "teacher top-k", progress)
    teacher.eval()
    for ids in batches:
        logits = teacher(input_ids=ids.to(device), use_cache=False).logits.float()
        v, i = logits.topk(min(k, logits.shape[-1]), dim=-1)
        out.append((v.cpu().contiguous(), i.to(torch.int32).cpu().contiguous()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tensors = {f"{n}.{j}": t for j, (v, i) in enumerate(out) for n, t in (("values", v), ("indices", i))}
        save_file(tensors, str(tmp), metadata={"digest": digest, "k": str(k), "batches": str(len(batches))})
        os.replace(tmp, path)
    return out


# ------------------------------------------------------------------------------------------------ helpers

def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("device 'cuda' asked but CUDA is not available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over round(warmup · steps) steps, then cosine from lr to 0 at the last step."""
    warm = int(round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(cfg.steps - warm, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / span))


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, enabled: bool = True):
    """Recompute every block's activations in the backward pass (gradient checkpointing), for any family
    with an ArchSpec, in eval mode too (transformers' own switch only acts in train mode)."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    from ..models.arch import arch_for

    blocks = arch_for(model.config.model_type).block_list(model)
    for b in blocks:
        def fwd(*args, _orig=b.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
        b.forward = fwd  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _forward(model, ids: Tensor, hidden: bool):
    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (out.hidden_states if hidden else None)


@torch.no_grad()
def eval_perplexity(model: torch.nn.Module, batches: list[Tensor], device) -> float:
    """exp(mean next-token CE) over held-out batches."""
    was = model.training
    model.eval()
    try:
        nll = [float(losses.ce_loss(model(input_ids=b.to(device), use_cache=False).logits, b.to(device)))
               for b in batches]
    finally:
        model.train(was)
    return math.exp(sum(nll) / len(nll))


# ------------------------------------------------------------------------------------------------ checkpoints

def _optimizer_state(opt) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{key}"] = v.detach().cpu().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _cfg_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_IGNORES}


def save_checkpoint(folder: Path, step: int, params: dict[str, Tensor], opt, gen: torch.Generator, order: list[int],
                    history: list[float], evals: list, masks, cfg) -> None:
    from safetensors.torch import save_file

    from ..models.io import install_folder

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu().clone().contiguous() for n, p in params.items()}
    opt_t, opt_meta = _optimizer_state(opt)
    tensors.update(opt_t)
    tensors["rng.state"] = gen.get_state()
    if masks is not None:
        tensors.update({k: v.contiguous() for k, v in masks.state().items()})
    meta = {"step": step, "order": order, "history": history, "evals": evals, "optimizer": opt_meta,
            "config": _cfg_dict(cfg)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta))
        install_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path, cfg) -> tuple[dict, dict[str, Tensor]] | None:
    """(meta, tensors) of a checkpoint written under the same config, None when there is none."""
    from safetensors.torch import load_file

    from ..models.hf import check_safetensors

    folder = Path(folder)
    if not (folder / STATE_JSON).exists():
        return None
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptModel(f"{folder}/{STATE_JSON} is not valid JSON: delete the checkpoint folder to restart") from None
    if meta.get("config") != _cfg_dict(cfg):
        diff = sorted(k for k in _cfg_dict(cfg) if meta.get("config", {}).get(k) != _cfg_dict(cfg)[k])
        raise BadInput(f"{folder} holds a checkpoint of a different run (differs in {', '.join(diff[:5])}): "
                       f"choose another checkpoint folder or delete it")
    check_safetensors(folder / STATE_TENSORS)
    return meta, load_file(str(folder / STATE_TENSORS))


# ------------------------------------------------------------------------------------------------ the loop

def distill(student: torch.nn.Module, teacher: torch.nn.Module | None, batches: list[Tensor], cfg,
            eval_batches: list[Tensor] | None = None, kept: list[int] | None = None, progress: bool = False,
            stop_after: int | None = None) -> dict:
    """Train `student` in place towards `teacher` per `cfg` (a recipe.Distill). Returns the history:
    loss (per step), first, last, steps, seconds, evals [(step, perplexity)], trained_params, resumed_from.

    kept: for a student made by dropping blocks, the teacher index of each kept block (hidden-state pairs);
    stop_after: return after that many steps in total (as an interruption would; the tests use it)."""
    from ..compress import linear_layers
    from ..prune.gradual import MaskSchedule
    from .student import layer_pairs, projections

    if not batches:
        raise BadInput("distillation needs at least one batch of token ids")
    needs_teacher = cfg.kl_weight > 0 or cfg.hidden_weight > 0
    if needs_teacher and teacher is None and not (cfg.topk and cfg.cache):
        raise BadInput("this distillation loss needs a teacher (kl_weight or hidden_weight > 0)")
    device = resolve_device(cfg.device)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    hidden = cfg.hidden_weight > 0
    pairs = proj = None
    if hidden:
        pairs = layer_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers, kept)
        proj = projections(student.config.hidden_size, teacher.config.hidden_size, len(pairs), cfg.seed)
        if proj is not None:
            proj.to(device)
    cached = None
    if cfg.kl_weight > 0 and cfg.topk:
        cached = teacher_topk(teacher, batches, cfg.topk, cfg.cache, device, progress)

    params = {f"student.{n}": p for n, p in student.named_parameters()}  # tied weights once
    if proj is not None:
        params.update({f"proj.{n}": p for n, p in proj.named_parameters()})
    flags = [(p, p.requires_grad) for p in student.parameters()]
    for p in params.values():
        p.requires_grad_(True)
    plist = list(params.values())
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(plist, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    layers = {n: m for n, m in linear_layers(student).items() if not n.endswith("lm_head")}
    if cfg.sparsity is not None:
        masks = MaskSchedule(layers, cfg.sparsity, start=0, end=int(cfg.sparsity_end * cfg.steps),
                             every=cfg.prune_every, scope=cfg.sparsity_scope)
    else:
        masks = MaskSchedule.fixed(layers) if cfg.keep_zeros else None
        masks = masks if masks is not None and masks.masks else None

    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[float] = []
    evals: list = []
    start = 0
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None:
        found = load_checkpoint(ckpt, cfg)
        if found is not None:
            meta, tensors = found
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tensors[f"param.{n}"].to(device))
            _load_optimizer(opt, tensors, meta["optimizer"])
            gen.set_state(tensors["rng.state"])
            if masks is not None:
                masks.load_state(tensors)
            start, order, history, evals = meta["step"], meta["order"], meta["history"], meta["evals"]
    resumed_from = start
    if masks is not None and start == 0:
        masks.update(0)

    amp = cfg.amp and device.type == "cuda"
    was_training = student.training
    student.eval()
    bar = _bar(cfg.steps, "distill", progress)
    if bar is not None:
        bar.update(start)
    t0 = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    try:
        with torch.enable_grad(), checkpointed_blocks(student, cfg.grad_checkpointing):
            for step in range(start, end):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(cfg.grad_accum):
                    if not order:
                        order = torch.randperm(len(batches), generator=gen).tolist()
                    bi = order.pop()
                    ids = batches[bi].to(device)
                    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                        value = _loss(student, teacher, ids, cfg, hidden, pairs, proj,
                                      cached[bi] if cached is not None else None, device)
                    (value / cfg.grad_accum).backward()
                    total += float(value.detach()) / cfg.grad_accum
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(plist, cfg.clip)
                opt.step()
                if masks is not None:
                    with torch.no_grad():
                        masks.update(step + 1)
                history.append(total)
                done = step + 1
                if eval_batches and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    evals.append((done, eval_perplexity(student, eval_batches, device)))
                if bar is not None:
                    post = {"loss": f"{total:.4f}"}
                    if evals:
                        post["ppl"] = f"{evals[-1][1]:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if ckpt is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    save_checkpoint(ckpt, done, params, opt, gen, order, history, evals, masks, cfg)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        student.train(was_training)
        if bar is not None:
            bar.close()
    return {"loss": history, "first": history[0] if history else None, "last": history[-1] if history else None,
            "steps": len(history), "seconds": time.perf_counter() - t0, "evals": evals,
            "trained_params": sum(p.numel() for p in plist), "resumed_from": resumed_from}


def _loss(student, teacher, ids, cfg, hidden, pairs, proj, cached, device) -> Tensor:
    s_logits, s_h = _forward(student, ids, hidden)
    total = s_logits.new_zeros((), dtype=torch.float32)
    t_logits = t_h = None
    if teacher is not None and ((cfg.kl_weight > 0 and cached is None) or hidden):
        with torch.no_grad():
            t_logits, t_h = _forward(teacher, ids, hidden)
    if cfg.kl_weight > 0:
        if cached is not None:
            v, i = cached
            total = total + cfg.kl_weight * losses.topk_kl_loss(s_logits, v.to(device), i.to(device), cfg.temperature)
        else:
            total = total + cfg.kl_weight * losses.kl_loss(s_logits, t_logits, cfg.temperature)
    if hidden:
        total = total + cfg.hidden_weight * losses.hidden_loss(s_h, t_h, pairs, proj)
    if cfg.ce_weight > 0:
        total = total + cfg.ce_weight * losses.ce_loss(s_logits, ids)
    return total


# ------------------------------------------------------------------------------------------------ recipe glue

def run_step(lm, model: torch.nn.Module, step, teacher_model: torch.nn.Module | None = None,
             progress: bool = False, kept: list[int] | None = None) -> dict:
    """Apply a recipe.Distill step to `lm` (a LoadedModel, or a model with `tokenizer` given through lm):
    teacher = step.teacher loaded from disk (same tokenizer required), else `teacher_model`, else the model
    reloaded from lm.source (as it was before the recipe: recovery after pruning). Returns distill()'s history."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise BadInput("Distill draws its training text with the model's tokenizer: pass a LoadedModel")
    if step.teacher is not None:
        from ..models import check_same_tokenizer, load

        t_lm = load(step.teacher)
        check_same_tokenizer(t_lm, lm)
        teacher_model = t_lm.model
    if teacher_model is None and (step.kl_weight > 0 or step.hidden_weight > 0):
        if getattr(lm, "kind", "memory") == "memory":
            raise BadInput("Distill has no teacher: set `teacher` to a model path (without one, the teacher is the "
                           "model the student was loaded from, and this one was built in memory)")
        from ..models import load

        teacher_model = load(lm.source).model  # the model as loaded, before this recipe changed it
    bos = getattr(lm, "bos_id", None)
    train, held = training_batches(tokenizer, step, bos)
    res = distill(model, teacher_model, train, step, eval_batches=held, kept=kept, progress=progress)
    model.to("cpu")
    if held:
        res["eval_perplexity"] = eval_perplexity(model, held, "cpu")
    return res
