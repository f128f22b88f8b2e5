"""w8a8-static: activation observers (quant/activations) and the static int8 linear (nn/int8_static)."""

from __future__ import annotations

import copy
import inspect
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpress.errors import BadInput
from lmpress.nn.int8_static import Int8StaticLinear, emulate_static_kernel
from lmpress.quant.activations import (MinMaxObserver, MSEObserver, PercentileObserver, calibrate_activations,
                                       fake_quantize_act, make_observer)

from conftest import tiny_model

fbgemm_only = pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"),
                                 reason="the static kernel is fbgemm's")


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


# ------------------------------------------------------------------------------------------------ observers

def test_minmax_observer_by_hand():
    obs = MinMaxObserver()
    obs.update(torch.tensor([[-1.0, 2.0], [0.5, 3.0]]))
    obs.update(torch.tensor([[[-2.0, 1.0]]]))
    assert obs.range() == (-2.0, 3.0)
    # scale = (3 − (−2)) / 127; zero = round(0 − (−2) / scale) = round(50.8) = 51; 0 maps to code 51 exactly
    assert obs.qparams() == (_f32(5 / 127), 51)
    pos = MinMaxObserver()
    pos.update(torch.tensor([0.5, 2.54]))  # all positive: the range is widened to include 0 → zero 0
    assert pos.qparams() == (_f32(2.54 / 127), 0)


def test_percentile_observer_against_torch_quantile():
    x = torch.arange(10001.0)[torch.randperm(10001, generator=torch.Generator().manual_seed(0))]
    obs = PercentileObserver(p=99.99)
    obs.update(x.reshape(1, 73, 137))
    assert obs.range() == pytest.approx((1.0, 9999.0), abs=1e-6)  # hand values: 1e-4 · 10000 from each end

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 50_000, generator=g), torch.randn(30_000, generator=g) * 2 + 0.5
    for p in (99.99, 99.0, 100.0):
        q = p / 100
        obs = PercentileObserver(p=p)
        obs.update(a)
        ref = (torch.quantile(a.flatten(), 1 - q).item(), torch.quantile(a.flatten(), q).item())
        assert obs.range() == pytest.approx(ref, rel=1e-5, abs=1e-6)
        obs.update(b)  # batches combine as the element-count-weighted mean of their percentiles
        rb = (torch.quantile(b, 1 - q).item(), torch.quantile(b, q).item())
        want = tuple((ra * a.numel() + r * b.numel()) / (a.numel() + b.numel()) for ra, r in zip(ref, rb))
        assert obs.range() == pytest.approx(want, rel=1e-5, abs=1e-6)
    with pytest.raises(BadInput, match="percentile"):
        PercentileObserver(p=30)


def _mse(x: torch.Tensor, qp: tuple[float, int]) -> float:
    return (fake_quantize_act(x, *qp) - x).double().pow(2).mean().item()


def test_mse_observer_never_worse_than_minmax_with_bounded_memory():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, 10_000, generator=g) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())  # heavy (exponential) tails
    outliers = torch.randn(3, 10_000, generator=g)  # a Gaussian body with rare large outliers
    outliers.view(-1)[torch.randint(0, 30_000, (15,), generator=g)] = 40.0
    for x, gain in [(laplace, 0.9), (outliers, 1.0)]:  # measured 0.83 and 0.99 (clipping the 40s costs)
        mse, mm = MSEObserver(), MinMaxObserver()
        for batch in x:
            mse.update(batch)
            mm.update(batch)
        assert mse.sample.numel() == x.numel()  # the sample holds everything while it fits: exact here
        assert _mse(x, mse.qparams()) <= gain * _mse(x, mm.qparams())
    assert mse.range()[1] <= mm.range()[1]

    light = torch.rand(5000, generator=g) * 4 - 1  # uniform: min-max is already best, and kept on ties
    obs = MSEObserver()
    obs.update(light)
    assert _mse(light, obs.qparams()) <= _mse(light, _seen(light).qparams())

    small = MSEObserver(sample_size=2048)
    for batch in laplace:
        small.update(batch)
    assert small.sample.numel() == 2048 and small.count == laplace.numel()  # a fixed-size sample, never all
    assert (small.lo, small.hi) == _seen(laplace).range()  # the min-max range itself stays exact
    f, err, err_minmax = small.search()
    assert f < 1 and err < err_minmax  # on its sample it clipped and gained


def _seen(x: torch.Tensor) -> MinMaxObserver:
    obs = MinMaxObserver()
    obs.update(x)
    return obs


def test_observer_errors():
    with pytest.raises(BadInput, match="unknown activation observer 'kl'"):
        make_observer("kl")
    with pytest.raises(BadInput, match="has seen no activations"):
        MinMaxObserver().qparams()
    with pytest.raises(BadInput, match="inf or NaN"):
        MSEObserver().update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(BadInput, match="observer 'minmax'"):
        make_observer("minmax", p=99.0)
    assert isinstance(make_observer("PERCENTILE", p=99.9), PercentileObserver)


# ----------------------------------------------------------------------------------------------- calibration

def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


def _ids(seed: int, n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_calibrate_tiny_llama_and_run_static(tokenizer, observer):
    lm = tiny_model("llama", tokenizer)
    model = lm.model.train()  # calibration runs in eval mode and restores the flags
    layers = _linears(model)
    assert len(layers) == 14
    qp = calibrate_activations(model, layers, [_ids(s) for s in range(3)], observer=observer)
    assert set(qp) == set(layers)
    for scale, zero in qp.values():
        assert scale > 0 and 0 <= zero <= 127 and isinstance(zero, int)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())

    model.eval()
    ids = _ids(100)
    with torch.no_grad():
        base = model(ids).logits
        for name, mod in layers.items():
            model.set_submodule(name, Int8StaticLinear.from_linear(mod, *qp[name]))
        out = model(ids).logits
    assert sum(isinstance(m, Int8StaticLinear) for m in model.modules()) == 14
    # measured (minmax / percentile / mse): cosine 0.99970 / 0.99965 / 0.99968, KLD 7.8e-6 / 9.0e-6 / 8.2e-6
    # (stories260K calibrated on WikiText: KLD 9e-2 / 3.6e-2 / 3.8e-2, nearly all of it from down_proj, whose
    # inputs have outliers a per-tensor grid cannot serve; w8a8-dynamic there: 9.5e-3)
    assert F.cosine_similarity(out.flatten(), base.flatten(), 0) > 0.999
    assert _kld(base, out) < 5e-5
    assert not torch.equal(out, base)


def test_calibrate_removes_hooks_on_error_and_checks_inputs(tokenizer):
    lm = tiny_model("llama", tokenizer)
    model = lm.model.eval()
    layers = _linears(model)

    def batches():
        yield _ids(0)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        calibrate_activations(model, layers, batches())
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(BadInput, match="unknown activation observer"):
        calibrate_activations(model, layers, [_ids(0)], observer="entropy")
    with pytest.raises(BadInput, match="no calibration batches"):
        calibrate_activations(model, layers, [])
    spare = nn.Linear(64, 64)  # not on the forward path
    with pytest.raises(BadInput, match="no calibration data reached layer.*spare"):
        calibrate_activations(model, {**layers, "spare": spare}, [_ids(0)])
    assert all(not m._forward_pre_hooks for m in [*model.modules(), spare])
    assert not torch.is_inference_mode_enabled()

    from lmpress.data import Window  # windows and 1-D id tensors are batches too

    qp = calibrate_activations(model, {"model.layers.0.mlp.down_proj": layers["model.layers.0.mlp.down_proj"]},
                               [Window(_ids(0)[0], 1, (0, 24)), _ids(1)[0]], observer="percentile", p=99.0)
    assert set(qp) == {"model.layers.0.mlp.down_proj"}


# ------------------------------------------------------------------------------------------------- the module

def _layer(i: int, o: int, bias: bool = True, seed: int = 0, scale: float = 0.03, zero: int = 60):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.bias.normal_() if bias else None
    return lin, Int8StaticLinear.from_linear(lin, scale, zero)


@fbgemm_only
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 96), (2, 7, 96), (96,), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grid", [(0.03, 60), (1e-3, 0), (0.2, 127)])
def test_forward_is_the_exact_integer_math(shape, bias, grid):
    lin, m = _layer(96, 40, bias, scale=grid[0], zero=grid[1])
    x = torch.randn(*shape) * grid[0] * 40  # partly beyond the grid: saturation is part of the math
    y, ref = m(x), m.forward_reference(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    if not y.numel():
        return
    assert torch.equal(y, ref)  # bit for bit on this machine (fbgemm)
    x2 = x.reshape(-1, 96)
    assert torch.equal(ref.reshape(-1, 40), emulate_static_kernel(x2, *grid, m.qweight, m.scales, m.bias))
    # the emulation is the plain integer recipe: codes, int32 dot products, one float rescale
    codes = torch.clamp(torch.round(x2 / _f32(grid[0])) + grid[1], 0, 127)
    acc = (codes.double() - grid[1]) @ m.qweight.double().t()
    want = acc * (grid[0] * m.scales.double()) + (m.bias.double() if bias else 0)
    torch.testing.assert_close(ref.reshape(-1, 40).double(), want, rtol=0, atol=1e-5 * (1 + want.abs().max().item()))


def test_other_quantized_engine_falls_back_to_the_same_math():
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("no onednn engine in this torch build")
    _, m = _layer(48, 16)
    x = torch.randn(4, 48) * 2
    ref = m.forward_reference(x)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "onednn"  # its packed weight lacks the static fp32-output op
        fresh = copy.deepcopy(m)
        assert torch.equal(fresh(x), ref)
    finally:
        torch.backends.quantized.engine = engine


def test_accuracy_inside_the_range():
    lin, m = _layer(256, 64, scale=4.0 / 127, zero=64)  # grid ≈ [−2.02, 1.98]
    x = torch.randn(32, 256) * 0.5
    with torch.no_grad():
        rel = ((m(x) - lin(x)).norm() / lin(x).norm()).item()
    assert 1e-4 < rel < 0.02  # measured 0.0051


def test_static_saturation():
    lin, m = _layer(64, 16, scale=0.01, zero=50)
    lo, hi = m.input_range()
    assert (lo, hi) == (_f32(-50 * _f32(0.01)), _f32(77 * _f32(0.01)))
    x = torch.randn(3, 64)
    x[0, :8] = 1e3  # far above the grid
    x[1, :8] = -1e3  # far below
    x[2, :8] = torch.tensor([hi, hi * 1.5, hi * 10, lo, lo * 2, lo * 100, 0.0, 1e-9])
    clamped = x.clamp(lo, hi)
    assert torch.equal(m(x), m(clamped))  # values outside the calibrated range saturate to its ends
    assert torch.equal(m(x), m.forward_reference(clamped))
    with torch.no_grad():
        assert torch.allclose(m(clamped), lin(clamped), rtol=0, atol=0.05)  # and the rest is close


def test_state_dict_round_trip_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    lin, m = _layer(80, 24, scale=0.021, zero=71)
    x = torch.randn(3, 5, 80)
    y = m(x)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "input_scale", "input_zero", "bias"}
    assert all(type(v) is torch.Tensor and not v.is_quantized for v in sd.values())
    assert sd["qweight"].dtype == torch.int8 and sd["scales"].dtype == torch.float32
    assert sd["input_scale"].dtype == torch.float32 and sd["input_zero"].dtype == torch.int32
    assert sd["input_scale"].item() == _f32(0.021) and sd["input_zero"].item() == 71
    save_file(sd, tmp_path / "layer.safetensors")

    fresh = Int8StaticLinear.empty(80, 24, bias=True)
    fresh(x)  # builds the packed cache for the empty state: loading must invalidate it
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh(x), y) and torch.equal(fresh(x[0, :1]), m(x[0, :1]))

    entry = m.lmpress_format()  # what a loader builds from the manifest entry (as nn.build_module does)
    assert entry["format"] == "w8a8-static" and entry["activations"] == "static-per-tensor"
    params = inspect.signature(Int8StaticLinear.empty).parameters
    built = Int8StaticLinear.empty(**{k: v for k, v in entry.items() if k in params})
    built.load_state_dict(sd)
    assert torch.equal(built(x), y)
    assert torch.equal(copy.deepcopy(m)(x), y)
    assert "bias" not in Int8StaticLinear.from_linear(nn.Linear(8, 4, bias=False), 0.1, 0).state_dict()


def test_from_conv1d_and_bad_inputs():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # GPT-2's linear: weight [I, O]
    m = Int8StaticLinear.from_linear(conv, 0.05, 64)
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), conv(x), atol=0.05)
    assert torch.allclose(m.dequantize(), conv.weight.t(), atol=m.scales.max().item())

    lin = nn.Linear(16, 8)
    for scale, zero in [(0.0, 3), (-1.0, 3), (float("nan"), 3), (0.1, 128), (0.1, -1), (0.1, 2.5)]:
        with pytest.raises(BadInput, match="input_"):
            Int8StaticLinear.from_linear(lin, scale, zero)
    m = Int8StaticLinear.from_linear(lin, 0.1, 3)
    with pytest.raises(BadInput, match=r"\[\.\.\., 16\]"):
        m(torch.randn(2, 15))
    with pytest.raises(BadInput, match="float input"):
        m(torch.ones(2, 16, dtype=torch.int64))
    assert m(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
