"""Round-to-nearest weight-only quantization: the data-free baseline every other method is measured against."""

from __future__ import annotations

import torch

from ..nn import linear_weight
from ..nn.packed import PackedLinear, pad_to_groups
from .primitives import QParams, compute_qparams, quantize


def storage_qparams(qp: QParams) -> QParams:
    """Scales and zeros rounded to fp16, the precision they are stored in, so that codes are chosen against
    exactly the values dequantization will use."""
    return QParams(scale=qp.scale.half().float(), zero=qp.zero.half().float(), bits=qp.bits,
                   group_size=qp.group_size, symmetric=qp.symmetric)


def quantize_rtn(mod: torch.nn.Module, step) -> PackedLinear:
    """A PackedLinear holding `mod`'s weight quantized to step.bits with step.group_size (None: per channel)."""
    w = linear_weight(mod)
    in_f = w.shape[1]
    w = pad_to_groups(w, step.group_size)  # a partial last group is padded with zeros
    qp = storage_qparams(compute_qparams(w, step.bits, step.group_size, symmetric=step.symmetric, clip=step.clip))
    return PackedLinear.from_codes(quantize(w, qp)[:, :in_f], qp, mod.bias, symmetric=step.symmetric)
