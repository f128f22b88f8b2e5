"""w8a8-dynamic: int8 weights, int8 activations per token at run time, on PyTorch's int8 kernel (nn/int8_dynamic)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpress.errors import BadInput
from lmpress import compress
from lmpress.nn.int8_dynamic import Int8DynamicLinear, emulate_kernel, quantize_weight
from lmpress.recipe import W8A8Dynamic


def quantize_dynamic_int8(model, include=None, exclude=r"(^|\.)lm_head$"):
    """The docs' one-liner: lmpress.compress(model, [W8A8Dynamic(...)]) works on any nn.Module."""
    return compress(model, [W8A8Dynamic(targets=include, ignore=exclude)])

from conftest import tiny_model


class SimpleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def test_simple_model_example():
    # The docs' example: any nn.Module, quantized to int8 dynamically, FP32 and INT8 outputs compared.
    torch.manual_seed(0)
    model_fp32 = SimpleModel().eval()
    x = torch.randn(64, 10)
    model_int8 = quantize_dynamic_int8(copy.deepcopy(model_fp32))
    with torch.no_grad():
        y_fp32, y_int8 = model_fp32(x), model_int8(x)
    rel = ((y_int8 - y_fp32).norm() / y_fp32.norm()).item()
    print(model_int8)
    print(f"relative error of the int8 model: {rel:.4f}")

    assert isinstance(model_int8.fc1, Int8DynamicLinear) and isinstance(model_int8.fc2, Int8DynamicLinear)
    assert isinstance(model_fp32.fc1, nn.Linear)  # the deepcopy kept the float model as it was
    assert y_int8.shape == y_fp32.shape == (64, 1) and y_int8.dtype == torch.float32
    assert rel < 0.02
    assert not torch.equal(y_int8, y_fp32)  # it did quantize


def _kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_tiny_llama_all_linears_but_lm_head(tokenizer):
    lm = tiny_model("llama", tokenizer)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lm.model(ids).logits
        linears = [n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
        q = quantize_dynamic_int8(lm.model)
        out = q(ids).logits
    assert q is lm.model
    kinds = {n: type(m) for n, m in q.named_modules()}
    assert len(linears) == 14 and all(kinds[n] is Int8DynamicLinear for n in linears)
    assert kinds["lm_head"] is nn.Linear
    assert not any(isinstance(m, nn.Linear) for n, m in q.named_modules() if n != "lm_head")
    # measured: cosine 0.99994, KLD 1.6e-6 (stories260K, a trained model: 0.9998, 1.2e-3)
    assert F.cosine_similarity(out.flatten(), base.flatten(), 0) > 0.999
    assert _kld(base, out) < 1e-4

    from lmpress.models.io import layer_formats

    fmt = layer_formats(q)
    assert fmt["model.layers.0.mlp.down_proj"] == {
        "format": "w8a8-dynamic", "bits": 8, "in_features": 128, "out_features": 64, "bias": False,
        "activations": "dynamic-per-token", "activation_range": "uint8 0..127 (reduce_range)",
        "scales_dtype": "float32"}
    assert fmt["lm_head"]["format"] == "dense"


def _layer(i: int, o: int, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, Int8DynamicLinear]:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.bias.normal_() if bias else None
    return lin, Int8DynamicLinear.from_linear(lin)


# The emulation is of fbgemm (the "x86" and "fbgemm" engines); other engines quantize activations their own way.
fbgemm_only = pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"),
                                 reason="emulates fbgemm's dynamic linear")


@fbgemm_only
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_kernel_matches_plain_torch_emulation(scale):
    # The int8 kernel's own math, written out in plain torch (per-tensor asymmetric uint8 activations from
    # min/max, ATen's ChooseQuantizationParams incl. its small-scale floor, int32 accumulation, float rescale):
    # it matches the kernel bit for bit on this machine; the bound leaves a last-bit margin for other CPUs.
    _, m = _layer(200, 48)
    packed = m._packed_weight()
    x = (torch.randn(7, 200) + 0.3) * scale
    y = torch.ops.quantized.linear_dynamic(x, packed, True)
    e = emulate_kernel(x, m.qweight, m.scales, m.bias)
    torch.testing.assert_close(y, e, rtol=0, atol=2e-6 * e.abs().max().item())


@fbgemm_only
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 96), (2, 7, 96), (96,), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_int8_kernel(shape, bias):
    # forward() (kernel + per-token scaling) against forward_reference() (the same with the emulated kernel)
    lin, m = _layer(96, 40, bias)
    x = torch.randn(*shape) * 3
    y, ref = m(x), m.forward_reference(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    if y.numel():
        torch.testing.assert_close(y, ref, rtol=0, atol=2e-6 * ref.abs().max().item())
        rel = ((y - lin(x)).norm() / lin(x).norm()).item()
        assert 1e-4 < rel < 0.03  # quantized, and close


def test_activation_scales_are_per_token():
    # A token with 1000× larger activations must not coarsen its neighbours' grid (it would per tensor).
    lin, m = _layer(64, 32, bias=False)
    x = torch.randn(4, 64)
    x[2] *= 1000
    with torch.no_grad():
        y, y_fp = m(x), lin(x)
        per_tensor = torch.ops.quantized.linear_dynamic(x, m._packed_weight(), True)
    err = lambda a: ((a - y_fp).norm(dim=1) / y_fp.norm(dim=1))  # noqa: E731
    assert (err(y) < 0.03).all()
    assert err(per_tensor)[0] > 0.3  # the kernel alone shares one grid across the batch


def test_state_dict_round_trip_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    lin, m = _layer(80, 24)
    x = torch.randn(3, 5, 80)
    y = m(x)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}
    assert all(type(v) is torch.Tensor and not v.is_quantized for v in sd.values())
    assert sd["qweight"].dtype == torch.int8 and sd["scales"].dtype == torch.float32
    save_file(sd, tmp_path / "layer.safetensors")

    fresh = Int8DynamicLinear.empty(80, 24, bias=True)
    fresh(x)  # builds the packed cache for the empty weights: loading must invalidate it
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh(x), y) and torch.equal(fresh(x[0, :1]), m(x[0, :1]))

    from lmpress.nn import build_module

    built = build_module(m.lmpress_format())  # what a loader does from the manifest entry
    built.load_state_dict(sd)
    assert torch.equal(built(x), y)
    assert torch.equal(copy.deepcopy(m)(x), y)
    assert "bias" not in Int8DynamicLinear.from_linear(nn.Linear(8, 4, bias=False)).state_dict()


def test_weight_codes_in_symmetric_range():
    torch.manual_seed(0)
    w = torch.randn(33, 70)
    w[0, 5] = -7.0  # rows whose largest magnitude is negative: −max/scale is exactly −127, never −128
    w[1] = -w[1].abs()
    w[2] = 0.0  # an all-zero row
    codes, scales = quantize_weight(w)
    assert codes.dtype == torch.int8 and codes.min() >= -127 and codes.max() <= 127
    assert codes[0, 5] == -127 and (codes[1].min() == -127) and (codes[2] == 0).all()
    assert torch.allclose(scales[3:], w[3:].abs().amax(1) / 127)
    lin = nn.Linear(70, 33)
    m = Int8DynamicLinear.from_linear(lin)
    assert m.qweight.min() >= -127 and m.qweight.max() <= 127
    deq = m.dequantize()  # the reference weight: within half a step of the float one
    assert deq.shape == (33, 70) and deq.dtype == torch.float32
    assert ((deq - lin.weight).abs() <= m.scales[:, None] / 2 + 1e-7).all()
    with pytest.raises(BadInput, match="inf or NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lm_head = nn.Linear(8, 4)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8DynamicLinear))}


def test_include_exclude_and_no_match():
    kinds = _kinds(quantize_dynamic_int8(_Net()))
    assert kinds == {"encoder.0": "Int8DynamicLinear", "encoder.2": "Int8DynamicLinear",
                     "attn.out_proj": "NonDynamicallyQuantizableLinear",  # read as .weight by attention
                     "lm_head": "Linear"}
    assert _kinds(quantize_dynamic_int8(_Net(), include=r"encoder\.2$"))["encoder.0"] == "Linear"
    kinds = _kinds(quantize_dynamic_int8(_Net(), exclude=None))
    assert kinds["lm_head"] == "Int8DynamicLinear"
    kinds = _kinds(quantize_dynamic_int8(_Net(), include="encoder", exclude=r"\.0$"))
    assert kinds["encoder.0"] == "Linear" and kinds["encoder.2"] == "Int8DynamicLinear"

    shared = nn.Linear(6, 6)
    seq = quantize_dynamic_int8(nn.Sequential(shared, nn.ReLU(), shared))
    assert isinstance(seq[0], Int8DynamicLinear) and seq[0] is seq[2]

    for kwargs in [dict(include="decoder"), dict(include="lm_head")]:  # lm_head: excluded by default
        net = _Net()
        with pytest.raises(BadInput, match="match no float linear layer"):
            quantize_dynamic_int8(net, **kwargs)
        assert _kinds(net)["encoder.0"] == "Linear"  # nothing changed
    with pytest.raises(BadInput, match="match no float linear layer"):
        quantize_dynamic_int8(nn.Sequential(nn.ReLU()))
    with pytest.raises(BadInput, match="invalid regular expression"):
        quantize_dynamic_int8(_Net(), include="(")


def test_bad_inputs_are_clear():
    _, m = _layer(16, 8)
    with pytest.raises(BadInput, match=r"\[\.\.\., 16\]"):
        m(torch.randn(2, 15))
    with pytest.raises(BadInput, match="float input"):
        m(torch.ones(2, 16, dtype=torch.int64))
    assert m(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
