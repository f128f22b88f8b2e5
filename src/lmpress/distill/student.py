"""Students made from their teacher, and how their layers correspond.

drop_layers(model, k): a copy of the teacher without k blocks, initialised from the teacher's weights; the
blocks removed are the k of least influence on calibration data (prune/structured.block_influence), or, with
no data, evenly spaced ones (never the first or last block, which matter most in practice). The returned
`kept` lists the teacher index of each student block: student hidden state i+1 (the output of its block i)
is matched to teacher hidden state kept[i]+1. For any other student, layer_pairs spaces the match evenly.
"""

from __future__ import annotations

import copy

import torch

from ..errors import BadInput
from ..models.arch import arch_for
from ..prune.structured import block_influence, remove_blocks


def evenly_spaced(n_blocks: int, k: int) -> list[int]:
    """k block indices spread over 1..n_blocks-2 (the first and last kept)."""
    inner = list(range(1, n_blocks - 1))
    if k > len(inner):
        raise BadInput(f"cannot drop {k} of {n_blocks} blocks evenly while keeping the first and last")
    return sorted({inner[int((i + 0.5) * len(inner) / k)] for i in range(k)})


def drop_layers(model: torch.nn.Module, k: int, data=None) -> tuple[torch.nn.Module, list[int]]:
    """(student, kept teacher block indices). The teacher is left unchanged."""
    spec = arch_for(model.config.model_type)
    n = len(spec.block_list(model))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n:
        raise BadInput(f"--drop-layers must be between 1 and {n - 1} (the teacher has {n} blocks), got {k!r}")
    if data:
        scores = block_influence(model, spec, data)
        drop = sorted(torch.sort(scores, stable=True).indices[:k].tolist())
    else:
        drop = evenly_spaced(n, k)
    student = copy.deepcopy(model)
    kept = remove_blocks(student, spec, drop)
    return student, kept


def layer_pairs(n_student: int, n_teacher: int, kept: list[int] | None = None) -> list[tuple[int, int]]:
    """(student, teacher) indices into the hidden-state tuples (0 = embeddings, i = after block i-1) for each
    student block output: the teacher block it came from, or evenly spaced."""
    if kept is not None:
        return [(i + 1, t + 1) for i, t in enumerate(kept)]
    return [(i + 1, round((i + 1) * n_teacher / n_student)) for i in range(n_student)]


def projections(d_student: int, d_teacher: int, n: int, seed: int = 0) -> torch.nn.ModuleList | None:
    """One learned linear map per matched layer when the widths differ (None when they are equal)."""
    if d_student == d_teacher:
        return None
    g = torch.Generator().manual_seed(seed)
    mods = torch.nn.ModuleList()
    for _ in range(n):
        lin = torch.nn.Linear(d_student, d_teacher, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_teacher, d_student, generator=g) / d_student ** 0.5)
        mods.append(lin)
    return mods
