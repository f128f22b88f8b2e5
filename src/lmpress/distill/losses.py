"""Distillation losses. Logits are [B, T, V], hidden states [B, T, D]; every loss is a mean over positions.

KL(teacher ‖ student) at temperature τ, times τ² so that its gradients keep their scale as τ changes (Hinton
et al., 2015). With the teacher's top-k cached (values, indices [B, T, k]), the teacher's distribution is its
softmax over those k logits (the tail dropped and the rest renormalised) and the student's log-probabilities
are its full-vocabulary log-softmax gathered at the k ids: the loss is then Σ_k p_k (log p_k − log q_k), the
KL to the truncated teacher (exactly the full KL's dominant terms; the student's mass outside the top k is
pushed down only through the normalisation of q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher/τ) ‖ softmax(student/τ)) · τ², mean over positions. [B, T, V] each."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


def topk_kl_loss(student: Tensor, values: Tensor, indices: Tensor, temperature: float = 1.0) -> Tensor:
    """As kl_loss against a teacher known only by its top-k logits `values` at ids `indices` [B, T, k]."""
    t = temperature
    log_p = F.log_softmax(values.float() / t, dim=-1)  # [B, T, k], renormalised over the k
    log_q = F.log_softmax(student.float() / t, dim=-1).gather(-1, indices.long())  # [B, T, k]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


def ce_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy: logits [B, T, V] predict ids[:, 1:]."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))


def hidden_loss(student_h: list[Tensor], teacher_h: list[Tensor], pairs: list[tuple[int, int]],
                proj: torch.nn.ModuleList | None) -> Tensor:
    """Mean over `pairs` (student index, teacher index into the hidden-state tuples) of the MSE between the
    (projected, when widths differ) student state and the teacher's, each normalised by the teacher state's
    mean square so that layers of different scale weigh alike."""
    total = student_h[0].new_zeros((), dtype=torch.float32)
    for n, (i, j) in enumerate(pairs):
        s, t = student_h[i].float(), teacher_h[j].float()
        if proj is not None:
            s = proj[n](s)
        total = total + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8)
    return total / max(len(pairs), 1)
