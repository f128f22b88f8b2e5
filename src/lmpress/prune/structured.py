"""Structured pruning: remove whole attention heads, MLP channels or blocks, leaving a smaller *dense* model.

The result is an ordinary transformers model whose config is shrunk (num_hidden_layers, intermediate_size,
num_attention_heads / num_key_value_heads, head_dim written explicitly), so `save` writes a folder that plain
`transformers.AutoModelForCausalLM.from_pretrained` loads without lmpress. It is faster on any hardware with
no special kernel: the matrices are simply smaller. Module paths and config keys come from the ArchSpec.

Units (`unit`):
  "mlp"    intermediate channel j of a block: row j of gate/up (and its bias), column j of down.
  "heads"  attention heads. GQA (H query heads sharing G key/value heads, r = H/G queries per group) is kept
           intact in one of two ways (`head_unit`):
             "query" (default): the same number of query heads is removed from every KV group, so every group
                      keeps r' < r queries; K/V projections and the KV cache are unchanged.
             "group": whole KV groups are removed (the K/V head and its r queries): smaller KV cache too.
           Needs a family whose config stores head_dim (llama-like): GPT-2 and OPT derive the head width from
           hidden_size / heads, so removing heads there would change the residual width; they are refused.
  "depth"  whole blocks; the remaining ones are renumbered (layer_idx) and per-layer config lists trimmed.

Importance (`importance`), a score per unit, lowest removed first (stable sort: ties remove the lower index):
  "magnitude"   L2 norm of every weight belonging to the unit (rows of q/k/v/gate/up, columns of o/down). Data-free.
  "activation"  the energy of the unit's contribution to the block output on calibration data:
                mlp: E[a_j²]·‖W_down[:, j]‖² (a_j the input of down); heads: E‖a_h W_o[:, h]ᵀ‖² (a_h the head's
                slice of o's input); exact per-unit output norms, measured with forward hooks.
  "taylor"      first-order Taylor |Σ_{w in unit} w·∂L/∂w| (Molchanov et al. 2019) with L the next-token
                cross-entropy summed over the calibration batches; for depth the sum runs over the block.
  "influence"   depth only: block influence 1 − mean cos(x_in, x_out) over calibration tokens (Men et al. 2024,
                ShortGPT): a block that barely changes its input is removed first.

How much: `ratio` (fraction of each layer's units removed, floor(ratio · n) — one float, or one per layer),
or `target_params` (the least uniform removal whose total parameter count is at most the target).

Per-layer sizes: transformers' Llama/Qwen2/GPT-2/OPT configs hold one intermediate_size and one head count
for every layer. So the stored width is uniform: with per-layer ratios, every layer stores the widest kept
width, and a layer asked to remove more has its extra units *zeroed* (down column / o-projection columns
and the matching input rows set to 0), which is exactly their removal in function. Loadable everywhere; the
compute saved is that of the least-pruned layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BadInput
from ..models.arch import ArchSpec, arch_for

UNITS = ("heads", "mlp", "depth")
IMPORTANCE = ("magnitude", "activation", "taylor", "influence")
HEAD_UNITS = ("query", "group")


# ------------------------------------------------------------------------------------------- validation

def check_ratio(ratio, n_layers: int | None = None) -> list[float] | float:
    """A ratio in [0, 1) or a list of them (one per layer)."""
    values = ratio if isinstance(ratio, (list, tuple)) else [ratio]
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise BadInput(f"structured pruning ratio must be a number in [0, 1) (the fraction of units removed, "
                           f"e.g. 0.25), got {r!r}")
    if isinstance(ratio, (list, tuple)):
        if n_layers is not None and len(ratio) != n_layers:
            raise BadInput(f"per-layer ratios: {len(ratio)} given for {n_layers} layers")
        return [float(r) for r in ratio]
    return float(ratio)


def check_choice(value, choices, what: str) -> str:
    if value not in choices:
        raise BadInput(f"unknown {what} '{value}' (choose from {', '.join(choices)})")
    return value


def _check_unit_importance(unit: str, importance: str) -> None:
    check_choice(unit, UNITS, "structured unit")
    check_choice(importance, IMPORTANCE, "importance")
    if unit == "depth" and importance not in ("influence", "taylor"):
        raise BadInput(f"depth pruning ranks blocks by 'influence' or 'taylor', not '{importance}'")
    if unit != "depth" and importance == "influence":
        raise BadInput("'influence' (block input/output similarity) ranks whole blocks: use it with --structured "
                       "depth; heads and MLP channels take magnitude, activation or taylor")


# ------------------------------------------------------------------------------------------- the plan

@dataclass
class Layout:
    """How the units of one kind sit in a model: per layer, `groups` × `per_group` units (MLP: 1 × I;
    heads/query: G × r; heads/group: 1 × G; depth: 1 × L, one "layer")."""

    unit: str
    head_unit: str
    n_layers: int
    groups: int
    per_group: int
    head_dim: int = 0


def layout(model: torch.nn.Module, spec: ArchSpec, unit: str, head_unit: str = "query") -> Layout:
    cfg = model.config
    blocks = spec.block_list(model)
    if unit == "depth":
        return Layout(unit, head_unit, 1, 1, len(blocks))
    if unit == "mlp":
        return Layout(unit, head_unit, len(blocks), 1, _lin_out(spec.get(blocks[0], spec.up)))
    if spec.head_dim_key is None or spec.q is None:
        raise BadInput(f"head pruning needs separate q/k/v projections and a config with head_dim; "
                       f"'{spec.family}' derives the head width from hidden_size, so its heads cannot be removed "
                       f"(use --structured mlp or depth)")
    check_choice(head_unit, HEAD_UNITS, "head unit")
    H = getattr(cfg, spec.heads_key)
    G = getattr(cfg, spec.kv_heads_key, None) or H
    d = _lin_out(spec.get(blocks[0], spec.q)) // H
    if head_unit == "query":
        return Layout(unit, head_unit, len(blocks), G, H // G, d)
    return Layout(unit, head_unit, len(blocks), 1, G, d)


def removal_counts(lay: Layout, ratio) -> list[int]:
    """Units removed per group in each layer (floor(ratio · per_group)); refuses removing all of a layer."""
    ratios = ratio if isinstance(ratio, list) else [ratio] * lay.n_layers
    if len(ratios) != lay.n_layers:
        raise BadInput(f"per-layer ratios: {len(ratios)} given for {lay.n_layers} layers"
                       f"{' (depth pruning takes one ratio)' if lay.unit == 'depth' else ''}")
    counts = [min(lay.per_group, int(r * lay.per_group + 1e-6)) for r in ratios]
    what = {"mlp": "MLP channel", "depth": "block"}.get(lay.unit, "query head of each KV group"
                                                       if lay.head_unit == "query" else "KV group")
    for i, m in enumerate(counts):
        if m >= lay.per_group:
            raise BadInput(f"ratio {ratios[i]} removes every {what} (of {lay.per_group})"
                           f"{'' if lay.unit == 'depth' else f' in layer {i}'}: use a smaller ratio")
    return counts


# ------------------------------------------------------------------------------------------- modules

def _lin_out(mod) -> int:
    return mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]


def _w(mod) -> Tensor:
    """[O, I] view of a linear's weight (GPT-2's Conv1D stores [I, O]); shares storage."""
    return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight


def _slice(mod, idx: Tensor, dim: str) -> None:
    """Keep only the output rows (dim="out") or input columns ("in") `idx` of a linear layer, in place."""
    conv = type(mod).__name__ == "Conv1D"
    axis = (1 if conv else 0) if dim == "out" else (0 if conv else 1)
    with torch.no_grad():
        mod.weight = torch.nn.Parameter(mod.weight.index_select(axis, idx).clone(),
                                        requires_grad=mod.weight.requires_grad)
        if dim == "out" and getattr(mod, "bias", None) is not None:
            mod.bias = torch.nn.Parameter(mod.bias[idx].clone(), requires_grad=mod.bias.requires_grad)
    if conv:
        if dim == "out":
            mod.nf = len(idx)
    elif dim == "out":
        mod.out_features = len(idx)
    else:
        mod.in_features = len(idx)


def _zero(mod, idx: Tensor, dim: str) -> None:
    with torch.no_grad():
        w = _w(mod)
        if dim == "out":
            w[idx] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[idx] = 0
        else:
            w[:, idx] = 0


def _parent(block, path: str):
    return block.get_submodule(path.rpartition(".")[0]) if "." in path else block


def _unit_linears(spec: ArchSpec, lay: Layout) -> tuple[list[str], list[str], list[str]]:
    """(paths sliced by output rows of query-side units, by rows of KV-side units, by input columns)."""
    if lay.unit == "mlp":
        return [p for p in (spec.gate, spec.up) if p], [], [spec.down]
    return [spec.q], [spec.k, spec.v], [spec.o]


def channel_index(units: Tensor, width: int) -> Tensor:
    """Unit indices → the channel indices they cover (width channels each, e.g. head_dim)."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


# ------------------------------------------------------------------------------------------- scores

def _calib_batches(data) -> list[Tensor]:
    if not data:
        raise BadInput("this importance needs calibration data: token id batches [B, T]")
    return list(data)


def _run_hooked(model, data, hooks: list) -> None:
    """Run the calibration batches without gradients, then remove the hooks (even on error)."""
    try:
        with torch.no_grad():
            for ids in data:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def _unit_weight_groups(spec: ArchSpec, block, lay: Layout, q_per_kv: int):
    """For one block: a list of (weight [O, I] view, axis, unit-of-each-index) to sum scores over.
    axis 0: rows belong to units; axis 1: columns do. unit-of-index maps each row/column to a flat unit id."""
    out = []
    if lay.unit == "mlp":
        n = lay.per_group
        ids = torch.arange(n)
        for p in (spec.gate, spec.up):
            if p:
                out.append((spec.get(block, p), 0, ids))
        out.append((spec.get(block, spec.down), 1, ids))
        return out
    d = lay.head_dim
    q_heads = torch.arange(lay.groups * lay.per_group if lay.head_unit == "query" else lay.per_group * q_per_kv)
    if lay.head_unit == "query":
        # query head h sits in group h // r at position h % r: flat unit = h (groups × per_group, row-major)
        q_units = q_heads.repeat_interleave(d)
        out += [(spec.get(block, spec.q), 0, q_units), (spec.get(block, spec.o), 1, q_units)]
    else:
        q_units = (q_heads // q_per_kv).repeat_interleave(d)  # query head → its KV group
        kv_units = torch.arange(lay.per_group).repeat_interleave(d)
        out += [(spec.get(block, spec.q), 0, q_units), (spec.get(block, spec.o), 1, q_units),
                (spec.get(block, spec.k), 0, kv_units), (spec.get(block, spec.v), 0, kv_units)]
    return out


def _n_units(lay: Layout) -> int:
    return lay.groups * lay.per_group


def magnitude_scores(model, spec: ArchSpec, lay: Layout) -> list[Tensor]:
    """Per layer: [groups · per_group] L2 norms over every weight of the unit."""
    q_per_kv = _q_per_kv(model, spec)
    out = []
    for block in spec.block_list(model):
        s = torch.zeros(_n_units(lay), dtype=torch.float64)
        for mod, axis, units in _unit_weight_groups(spec, block, lay, q_per_kv):
            sq = _w(mod).detach().double().pow(2).sum(dim=1 - axis)  # per row (axis 0) or column (axis 1)
            s.index_add_(0, units, sq)
        out.append(s.sqrt())
    return out


def taylor_scores(model, spec: ArchSpec, lay: Layout, data) -> list[Tensor]:
    """|Σ_{w in unit} w · ∂L/∂w| per unit, L = next-token CE summed over the calibration batches."""
    grads = _weight_grads(model, data)
    q_per_kv = _q_per_kv(model, spec)
    out = []
    for block in spec.block_list(model):
        s = torch.zeros(_n_units(lay), dtype=torch.float64)
        for mod, axis, units in _unit_weight_groups(spec, block, lay, q_per_kv):
            g = grads[id(mod.weight)]
            g = g.t() if type(mod).__name__ == "Conv1D" else g
            prod = (_w(mod).detach().double() * g.double()).sum(dim=1 - axis)
            s.index_add_(0, units, prod)
            if axis == 0 and getattr(mod, "bias", None) is not None:
                s.index_add_(0, units, mod.bias.detach().double() * grads[id(mod.bias)].double())
        out.append(s.abs())
    return out


def _weight_grads(model, data) -> dict[int, Tensor]:
    """Gradients of the summed next-token CE over `data` for every parameter, by id(param)."""
    data = _calib_batches(data)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for ids in data:
                logits = model(input_ids=ids, use_cache=False).logits.float()  # [B, T, V]
                V = logits.shape[-1]
                F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum").backward()
        return {id(p): (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in params}
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        model.train(was_training)


def activation_scores(model, spec: ArchSpec, lay: Layout, data) -> list[Tensor]:
    """Per layer: Σ over calibration tokens of ‖unit contribution to the block output‖² (see the docstring)."""
    data = _calib_batches(data)
    blocks = spec.block_list(model)
    q_per_kv = _q_per_kv(model, spec)
    scores = [torch.zeros(_n_units(lay), dtype=torch.float64) for _ in blocks]
    hooks = []

    def hook_for(i: int, mod):
        W = _w(mod).detach().double()  # [D, I]

        def hook(_m, args):
            x = args[0].detach().double().reshape(-1, W.shape[1])  # [N, I]
            if lay.unit == "mlp":
                scores[i] += x.pow(2).sum(0) * W.pow(2).sum(0)  # rank-1 contribution x_j·w_j per channel
                return
            d = lay.head_dim
            H = W.shape[1] // d
            per_head = torch.stack([(x[:, h * d:(h + 1) * d] @ W[:, h * d:(h + 1) * d].t()).pow(2).sum()
                                    for h in range(H)])  # [H]
            if lay.head_unit == "query":
                scores[i] += per_head
            else:
                scores[i].index_add_(0, torch.arange(H) // q_per_kv, per_head)
        return hook

    path = spec.down if lay.unit == "mlp" else spec.o
    for i, block in enumerate(blocks):
        mod = spec.get(block, path)
        hooks.append(mod.register_forward_pre_hook(hook_for(i, mod)))
    _run_hooked(model, data, hooks)
    return scores


def block_influence(model, spec: ArchSpec, data) -> Tensor:
    """[L] 1 − mean over calibration tokens of cos(block input, block output)."""
    data = _calib_batches(data)
    blocks = spec.block_list(model)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    count = [0]
    hooks = []

    def hook_for(i: int):
        def hook(_m, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1]), dim=-1)
            total[i] += (1 - cos).sum()
            if i == 0:
                count[0] += cos.numel()
        return hook

    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_hook(hook_for(i), with_kwargs=True))
    _run_hooked(model, data, hooks)
    return total / max(count[0], 1)


def block_taylor(model, spec: ArchSpec, data) -> Tensor:
    grads = _weight_grads(model, data)
    return torch.tensor([abs(sum(float((p.detach().double() * grads[id(p)].double()).sum()) for p in b.parameters()))
                         for b in spec.block_list(model)], dtype=torch.float64)


def scores_for(model, spec: ArchSpec, lay: Layout, importance: str, data=None) -> list[Tensor]:
    """One score tensor per layer, [groups · per_group] (depth: one tensor [L])."""
    if lay.unit == "depth":
        return [block_influence(model, spec, data) if importance == "influence" else block_taylor(model, spec, data)]
    if importance == "magnitude":
        return magnitude_scores(model, spec, lay)
    if importance == "activation":
        return activation_scores(model, spec, lay, data)
    return taylor_scores(model, spec, lay, data)


def _q_per_kv(model, spec: ArchSpec) -> int:
    cfg = model.config
    H = getattr(cfg, spec.heads_key)
    G = getattr(cfg, spec.kv_heads_key, None) if spec.kv_heads_key else None
    return H // (G or H)


# ------------------------------------------------------------------------------------------- selection

def select_units(score: Tensor, lay: Layout, remove: int, stored_remove: int) -> tuple[Tensor, Tensor]:
    """One layer's scores [groups · per_group] → (kept flat unit ids, ascending; ids among them to zero).
    In each group the `remove` lowest are removed: the lowest `stored_remove` physically, the rest zeroed."""
    s = score.reshape(lay.groups, lay.per_group)
    order = torch.sort(s, dim=1, stable=True).indices  # ascending: lowest first
    base = (torch.arange(lay.groups) * lay.per_group)[:, None]
    drop = (order[:, :stored_remove] + base).reshape(-1)
    zero = (order[:, stored_remove:remove] + base).reshape(-1)
    keep = torch.ones(_n_units(lay), dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero()[:, 0], torch.sort(zero).values


# ------------------------------------------------------------------------------------------- surgery

def _set_attrs(mod, **values) -> None:
    for k, v in values.items():
        if hasattr(mod, k):
            setattr(mod, k, v)


def remove_blocks(model: torch.nn.Module, spec: ArchSpec, drop: list[int]) -> list[int]:
    """Delete blocks `drop` in place; returns the kept original indices. layer_idx attributes are renumbered and
    config lists with one entry per layer (layer_types) trimmed."""
    blocks = spec.block_list(model)
    L = len(blocks)
    kept = [i for i in range(L) if i not in set(drop)]
    if not kept:
        raise BadInput(f"removing {len(set(drop))} of {L} blocks leaves none")
    new = torch.nn.ModuleList([blocks[i] for i in kept])
    for j, b in enumerate(new):
        for m in b.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    model.set_submodule(spec.blocks, new)
    cfg = model.config
    for key, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == L and key != "architectures":
            setattr(cfg, key, [value[i] for i in kept])
    setattr(cfg, spec.layers_key, len(kept))
    return kept


def _shrink_layer(model, spec: ArchSpec, block, lay: Layout, keep: Tensor, zero: Tensor) -> None:
    """Zero the units `zero`, then keep only the units `keep` (flat ids) of one block, in place."""
    q_out, kv_out, ins = _unit_linears(spec, lay)
    if lay.unit == "heads" and lay.head_unit == "group":
        r = _q_per_kv(model, spec)
        kv_keep, kv_zero = channel_index(keep, lay.head_dim), channel_index(zero, lay.head_dim)
        q_keep = channel_index(channel_index(keep, r), lay.head_dim)  # KV group → its query heads → channels
        q_zero = channel_index(channel_index(zero, r), lay.head_dim)
    else:
        width = lay.head_dim if lay.unit == "heads" else 1
        q_keep, q_zero = channel_index(keep, width), channel_index(zero, width)
        kv_keep = kv_zero = None
    for p in q_out:
        _zero(spec.get(block, p), q_zero, "out")
    for p in ins:
        _zero(spec.get(block, p), q_zero, "in")
    for p in q_out:
        _slice(spec.get(block, p), q_keep, "out")
    for p in ins:
        _slice(spec.get(block, p), q_keep, "in")
    if kv_keep is not None:
        for p in kv_out:
            _zero(spec.get(block, p), kv_zero, "out")
            _slice(spec.get(block, p), kv_keep, "out")


def prune_structured(model: torch.nn.Module, unit: str, ratio=0.0, importance: str = "magnitude", data=None,
                     target_params: int | None = None, head_unit: str = "query") -> dict:
    """Remove units of `model` (a transformers causal LM with an ArchSpec) in place. Returns a report:
    unit, importance, ratio, params_before, params_after, removed (units removed per group in each layer, or the
    removed block indices for depth), removed_units (per layer: the flat unit ids removed or zeroed; a flat id is
    a query head, a KV group or an MLP channel), stored_removed (per group, physically).

    data: calibration batches of token ids [B, T] (needed by activation, taylor and influence)."""
    _check_unit_importance(unit, importance)
    spec = arch_for(model.config.model_type)
    lay = layout(model, spec, unit, head_unit)
    before = n_params(model)
    if target_params is not None:
        ratio = ratio_for_target(model, spec, lay, target_params)
    ratio = check_ratio(ratio, lay.n_layers if unit != "depth" else None)
    counts = removal_counts(lay, ratio)
    report = {"unit": unit, "importance": importance, "params_before": before, "ratio": ratio}
    if unit == "heads":
        report["head_unit"] = head_unit
    if max(counts) == 0:
        report.update(removed=[] if unit == "depth" else counts, params_after=before)
        return report
    scores = scores_for(model, spec, lay, importance, data)
    if unit == "depth":
        keep, _ = select_units(scores[0], lay, counts[0], counts[0])
        drop = sorted(set(range(lay.per_group)) - set(keep.tolist()))
        remove_blocks(model, spec, drop)
        report.update(removed=drop, scores=[float(s) for s in scores[0]], params_after=n_params(model))
        return report
    stored = min(counts)
    removed_units = []
    for block, score, m in zip(spec.block_list(model), scores, counts):
        keep, zero = select_units(score, lay, m, stored)
        gone = sorted(set(range(_n_units(lay))) - set(keep.tolist()))
        removed_units.append(sorted(gone + zero.tolist()))
        _shrink_layer(model, spec, block, lay, keep, zero)
    _update_config(model, spec, lay, lay.per_group - stored)
    report.update(removed=counts, stored_removed=stored, removed_units=removed_units, params_after=n_params(model))
    return report


def _update_config(model, spec: ArchSpec, lay: Layout, kept_per_group: int) -> None:
    cfg = model.config
    blocks = spec.block_list(model)
    if lay.unit == "mlp":
        setattr(cfg, spec.mlp_key, kept_per_group)
        for b in blocks:
            _set_attrs(_parent(b, spec.up), intermediate_size=kept_per_group)
        return
    H, G = getattr(cfg, spec.heads_key), getattr(cfg, spec.kv_heads_key, None) or getattr(cfg, spec.heads_key)
    r = H // G
    H2, G2 = (G * kept_per_group, G) if lay.head_unit == "query" else (kept_per_group * r, kept_per_group)
    setattr(cfg, spec.head_dim_key, lay.head_dim)  # no longer hidden_size / heads: written explicitly
    setattr(cfg, spec.heads_key, H2)
    if spec.kv_heads_key:
        setattr(cfg, spec.kv_heads_key, G2)
    for b in blocks:
        _set_attrs(_parent(b, spec.q), num_heads=H2, num_attention_heads=H2, num_key_value_heads=G2,
                   num_key_value_groups=H2 // G2)


# ------------------------------------------------------------------------------------------- sizes

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_per_unit(model, spec: ArchSpec, lay: Layout) -> int:
    """Parameters one unit of one layer holds (uniform across layers in the supported families)."""
    block = spec.block_list(model)[0]
    if lay.unit == "depth":
        return sum(p.numel() for p in block.parameters())
    total = 0
    q_out, kv_out, ins = _unit_linears(spec, lay)
    width = lay.head_dim if lay.unit == "heads" else 1
    q_width = width * (_q_per_kv(model, spec) if lay.unit == "heads" and lay.head_unit == "group" else 1)
    for p in q_out:
        mod = spec.get(block, p)
        total += q_width * (_w(mod).shape[1] + (mod.bias is not None))
    for p in ins:
        total += q_width * _w(spec.get(block, p)).shape[0]
    if lay.unit == "heads" and lay.head_unit == "group":
        for p in kv_out:
            mod = spec.get(block, p)
            total += width * (_w(mod).shape[1] + (mod.bias is not None))
    return total


def ratio_for_target(model, spec: ArchSpec, lay: Layout, target: int) -> float:
    """The smallest uniform ratio (a multiple of 1/per_group) whose pruned model has at most `target` params."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise BadInput(f"target parameter count must be a positive integer, got {target!r}")
    total, per = n_params(model), params_per_unit(model, spec, lay) * lay.groups * lay.n_layers
    for m in range(lay.per_group):
        if total - m * per <= target:
            return (m + 0.5) / lay.per_group  # mid-step: floor(ratio · per_group) == m exactly
    raise BadInput(f"target of {target:,} parameters is out of reach: removing all but one {lay.unit} unit per "
                   f"{'model' if lay.unit == 'depth' else 'group'} leaves {total - (lay.per_group - 1) * per:,}")


def run_step(lm, model: torch.nn.Module, step, progress: bool = False) -> dict:
    """Apply a recipe.StructuredPrune step (calibration: step.n_samples windows of step.seq_len tokens of the
    built-in corpus, for the importances that need data). Returns prune_structured's report."""
    data = None
    if step.importance != "magnitude":
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is None:
            raise BadInput(f"importance '{step.importance}' calibrates on text: pass a LoadedModel (with a tokenizer)")
        from ..data import builtin_text, calibration_windows, tokenize

        wins = calibration_windows(tokenize(tokenizer, builtin_text()), step.n_samples, step.seq_len, step.seed)
        data = [torch.stack([w.ids for w in wins[i:i + 4]]) for i in range(0, len(wins), 4)]
    report = prune_structured(model, step.unit, step.ratio, step.importance, data, step.target_params, step.head_unit)
    if hasattr(lm, "info"):
        lm.info.setdefault("structured", []).append({k: v for k, v in report.items() if k != "removed_units"})
    return report
