"""Native kernels (lmpress.kernels) against their torch twins (kernels/reference.py), and the modules that use them.

Tolerances: the weight-only kernels ("f32" and "q8" activations) compute in float32 what the twins compute in
float64 from the same codes and the same rounded activations, so they differ by float32 summation only:
max |y − ref| ≤ 2e-5 · max |ref| (observed ≤ 1e-6 relative). The w8a8 kernel is exact integer arithmetic with the
float32 steps of fbgemm, so it equals its twin bit for bit.
"""

import itertools
import warnings

import pytest
import torch

from conftest import tiny_model
from lmpress import kernels
from lmpress.compress import compress
from lmpress.kernels import reference as ref
from lmpress.nn.int8_dynamic import Int8DynamicLinear, quantize_weight
from lmpress.nn.packed import PackedLinear
from lmpress.quant.primitives import pack
from lmpress.recipe import RTN

pytestmark = pytest.mark.skipif(kernels.isa() == "none", reason="native kernels not built")

ISAS = sorted({"scalar", kernels.isa(), "avx2" if kernels.isa() == "vnni" else "scalar"})
REL = 2e-5
# (out, in, group): a partial last group (576/128, 40/32), one group per row with a partial block (100, 31),
# odd output counts, group 64 (two blocks per group), group 96 (three: a 64-column int4 unit straddles two groups)
# with a partial last group and block (200 = 2·96 + 8)
SHAPES = [(37, 576, 128), (33, 100, None), (5, 40, 32), (64, 576, 64), (3, 31, None), (13, 576, 96), (19, 200, 96)]


def packed(out_f, in_f, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = -(-in_f // group) if group else 1
    codes = torch.randint(1 if symmetric else 0, 2**bits, (out_f, in_f), dtype=torch.uint8, generator=g)
    scales = (torch.rand(ng, out_f, generator=g) * 0.02 + 1e-3).half()
    zeros = (torch.full((ng, out_f), 2.0 ** (bits - 1)) if symmetric
             else torch.randint(-2, 2**bits + 2, (ng, out_f), generator=g).float()).half()
    return pack(codes, bits), scales, zeros


def close(y, r):
    assert y.shape == r.shape and y.dtype == torch.float32
    assert (y - r).abs().max() <= REL * r.abs().max(), float((y - r).abs().max() / r.abs().max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_matches_reference(shape, bits, symmetric):
    out_f, in_f, group = shape
    qw, scales, zeros = packed(out_f, in_f, bits, group, symmetric)
    bias = torch.randn(out_f)
    for m in (1, 2, 3, 4, 5, 7, 16):
        x = torch.randn(m, in_f)
        for act in ("f32", "q8"):
            r = ref.linear_packed(x, qw, scales, zeros, bits, group, bias, act)
            for isa in ISAS:
                close(kernels.linear_packed(x, qw, scales, zeros, bits, group, bias, act, isa=isa, threads=1), r)
    # no bias, leading dimensions kept
    x = torch.randn(2, 3, in_f)
    close(kernels.linear_packed(x, qw, scales, zeros, bits, group, None), ref.linear_packed(x, qw, scales, zeros,
                                                                                            bits, group))


@pytest.mark.parametrize("shape", [(37, 576), (8, 33), (5, 64)])
def test_int8_weight_only_and_w8a8(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    qw, s = quantize_weight(torch.randn(out_f, in_f))
    bias = torch.randn(out_f)
    for m in (1, 3, 16):
        x = torch.randn(m, in_f) * 3
        for isa in ISAS:
            for act in ("f32", "q8"):
                close(kernels.linear_int8(x, qw, s, bias, act, isa=isa), ref.linear_int8(x, qw, s, bias, act))
            for mode in ("dynamic", "dynamic-per-token", "static"):
                for b in (bias, None):
                    y = kernels.linear_w8a8(x, qw, s, b, mode, 0.05, 60, isa=isa)
                    assert torch.equal(y, ref.linear_w8a8(x, qw, s, b, mode, 0.05, 60)), (m, isa, mode)


@pytest.mark.parametrize("shape", [(37, 576), (3, 31), (8, 33), (64, 7), (1, 1)])
def test_linear_float_matches_float64(shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    for m in (1, 2, 3, 5, 8, 16):
        x = torch.randn(m, in_f, generator=g)
        for b in (bias, None):
            r = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()
            for isa in ISAS:
                for threads in (1, 2):
                    close(kernels.linear_float(x, w, b, isa=isa, threads=threads), r)
    x = torch.randn(2, 3, in_f, generator=g)  # leading dimensions kept
    close(kernels.linear_float(x, w, bias), torch.nn.functional.linear(x.double(), w.double(), bias.double()).float())
    with pytest.raises(ValueError):
        kernels.linear_float(x, w.half(), None)


def test_runner_few_rows_float_path_equals_torch(tokenizer, monkeypatch):
    # NativeRunner's per-op path (a speculative verification: 5 tokens after a cached prefix) on the native float
    # kernel gives F.linear's logits up to summation order
    from lmpress.runtime import NativeRunner
    from lmpress.runtime import model as runtime_model

    lm = tiny_model("qwen2", tokenizer)  # biased q/k/v projections
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for rows in (8, 0):
        monkeypatch.setattr(runtime_model, "FLOAT_MAX_ROWS", rows)
        r = NativeRunner(lm, max_len=32)
        r.prefill(ids[:, :7])
        out[rows] = r.prefill(ids[:, 7:], start=7, all_logits=True)
    assert out[8].shape == (1, 5, lm.config.vocab_size)
    close(out[8], out[0])


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape", [(37, 576, 64), (5, 40, 8), (13, 100, None), (3, 31, None), (19, 200, 24),
                                   (64, 576, 32), (8, 7, None)])
def test_lowbit_matches_reference(shape, bits):
    # int2/int3: partial last chunk (100, 31, 7 columns), a partial last group (200 = 8·24 + 8), odd row counts
    out_f, in_f, group = shape
    qw, scales, zeros = packed(out_f, in_f, bits, group, symmetric=False)
    bias = torch.randn(out_f)
    for m in (1, 2, 5, 16):
        x = torch.randn(m, in_f)
        r = ref.linear_packed(x, qw, scales, zeros, bits, group, bias, "f32")
        for isa in ISAS:
            for threads in (1, 2):
                close(kernels.linear_lowbit(x, qw, scales, zeros, bits, group, bias, isa=isa, threads=threads), r)
    x = torch.randn(2, 3, in_f)
    close(kernels.linear_lowbit(x, qw, scales, None, bits, group),
          ref.linear_packed(x, qw, scales, torch.zeros_like(zeros), bits, group))
    with pytest.raises(ValueError):
        kernels.linear_lowbit(x, qw, scales, zeros, 4, group)


def test_degenerate_activations():
    # all-zero rows (q8 block scale 0, w8a8 range 0) and a huge outlier stay finite and match the twins
    qw, scales, zeros = packed(16, 96, 4, 32, False)
    x = torch.zeros(3, 96)
    x[1, 5] = 1e6
    for act in ("f32", "q8"):
        close(kernels.linear_packed(x, qw, scales, zeros, 4, 32, None, act),
              ref.linear_packed(x, qw, scales, zeros, 4, 32, None, act))
    q8, s = quantize_weight(torch.randn(16, 96))
    for mode in ("dynamic", "dynamic-per-token"):
        assert torch.equal(kernels.linear_w8a8(x, q8, s, None, mode), ref.linear_w8a8(x, q8, s, None, mode))


def test_tile_params_layout():
    # per tile of 8 rows and per group: the tile's 8 scales then its 8 zeros, fp16 bits unchanged
    _, scales, zeros = packed(43, 200, 4, 32, False)
    t = kernels.tile_params(scales, zeros)
    ng = scales.shape[0]
    assert t.shape == (5, ng, 16) and t.dtype == torch.int16
    s16, z16 = scales.view(torch.int16), zeros.view(torch.int16)
    for tile in range(5):
        for g in range(ng):
            assert torch.equal(t[tile, g, :8], s16[g, 8 * tile:8 * tile + 8])
            assert torch.equal(t[tile, g, 8:], z16[g, 8 * tile:8 * tile + 8])
    assert torch.equal(kernels.tile_params(scales, None)[..., 8:], torch.zeros(5, ng, 8, dtype=torch.int16))
    with pytest.raises(ValueError):
        kernels.tile_params(scales.float(), zeros.float())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(8, 64, 32), (43, 576, 32), (37, 576, 128), (29, 200, 96), (1001, 256, 64),
                                   (9, 100, None)])
def test_one_row_with_and_without_tiles(shape, bits):
    # one activation row (the decode GEMV): scales / zeros from the caller's tile_params, regrouped by the call
    # itself, or read in place (per channel) give the same numbers, at any thread count (ranges of whole tiles)
    out_f, in_f, group = shape
    qw, scales, zeros = packed(out_f, in_f, bits, group, False, seed=3)
    bias = torch.randn(out_f)
    tiles = kernels.tile_params(scales, zeros)
    x = torch.randn(1, in_f)
    r = ref.linear_packed(x, qw, scales, zeros, bits, group, bias, "q8")
    for isa in ISAS:
        y = kernels.linear_packed(x, qw, scales, zeros, bits, group, bias, "q8", isa=isa, threads=1)
        close(y, r)
        for t in (1, 2, 3):
            yt = kernels.linear_packed(x, qw, scales, zeros, bits, group, bias, "q8", isa=isa, threads=t, tiles=tiles)
            assert torch.equal(yt, y), (isa, t)
    with pytest.raises(ValueError):
        kernels.linear_packed(x, qw, scales, zeros, bits, group, bias, "q8", tiles=tiles[:-1])


def test_threads_give_the_same_numbers():
    qw, scales, zeros = packed(1001, 256, 4, 64, False)
    q8, s = quantize_weight(torch.randn(1001, 256))
    x5, x1 = torch.randn(5, 256), torch.randn(1, 256)
    for isa in ISAS:
        for act, x in itertools.product(("f32", "q8"), (x5, x1)):
            one = kernels.linear_packed(x, qw, scales, zeros, 4, 64, None, act, isa=isa, threads=1)
            for t in (2, 3):
                assert torch.equal(kernels.linear_packed(x, qw, scales, zeros, 4, 64, None, act, isa=isa, threads=t), one)
        one = kernels.linear_w8a8(x5, q8, s, None, "dynamic-per-token", isa=isa, threads=1)
        assert torch.equal(kernels.linear_w8a8(x5, q8, s, None, "dynamic-per-token", isa=isa, threads=2), one)


def test_thread_pool_many_jobs_more_threads_than_cores():
    """Hundreds of back-to-back jobs of varying size and thread count (more threads than this machine's cores,
    so helpers are often descheduled and the caller finishes their chunks): every result equals one thread's."""
    shapes = [(9, 64), (1001, 256), (64, 128), (300, 64)]
    data = []
    for o, i in shapes:
        qw, scales, zeros = packed(o, i, 4, 64, False)
        x = torch.randn(1, i)
        data.append((x, qw, scales, zeros, kernels.linear_packed(x, qw, scales, zeros, 4, 64, None, "f32", threads=1)))
    for call in range(400):
        x, qw, scales, zeros, one = data[call % len(data)]
        t = (2, 3, 4, 8)[call % 4]
        assert torch.equal(kernels.linear_packed(x, qw, scales, zeros, 4, 64, None, "f32", threads=t), one), call


def test_thread_setting():
    kernels.set_num_threads(3)
    try:
        assert kernels.get_num_threads() == 3
    finally:
        kernels.set_num_threads(None)
    assert kernels.get_num_threads() == torch.get_num_threads()
    with pytest.raises(ValueError):
        kernels.set_num_threads(0)


def layer(bits, group, symmetric=False, in_f=576, out_f=77):
    torch.manual_seed(1)
    lin = torch.nn.Linear(in_f, out_f)
    return compress(torch.nn.Sequential(lin), [RTN(bits, group, symmetric=symmetric)])[0]


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (4, None), (8, 64), (8, None), (3, 64), (2, 32), (3, None)])
def test_packed_linear_uses_the_kernel(bits, group, monkeypatch):
    m = layer(bits, group)
    assert isinstance(m, PackedLinear)
    x = torch.randn(1, 3, 576)
    y, r = m(x), m.forward_reference(x)
    close(y, r)
    assert not torch.equal(y, r) or bits == 8  # (a different summation order: the native path really ran)
    monkeypatch.setattr(kernels, "ISA_CAP", "scalar")
    close(m(x), r)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(m(x), r)


def test_packed_linear_reference_cases():
    m5 = layer(5, 64)
    x = torch.randn(2, 576)
    assert torch.equal(m5(x), m5.forward_reference(x))      # no int5 kernel
    m3 = layer(3, 36)
    assert torch.equal(m3(x), m3.forward_reference(x))      # int3 in groups of 36: not whole chunks of 8
    m4 = layer(4, 128)
    big = torch.randn(kernels.MAX_ROWS + 1, 576)
    assert torch.equal(m4(big), m4.forward_reference(big))  # prefill-sized: the reference matmul
    xg = torch.randn(1, 576, requires_grad=True)
    y = m4(xg)
    y.sum().backward()                                       # needs a gradient: the reference path
    assert xg.grad is not None and torch.equal(y, m4.forward_reference(xg))
    m4.native_act = "q8"                                     # a layer may take the int8-activation kernel
    x1 = torch.randn(1, 576)
    close(m4(x1), ref.linear_packed(x1, m4.qweight, m4.scales, m4.zeros, 4, 128, m4.bias, "q8"))


@pytest.mark.parametrize("native", [False, True])  # fbgemm (the default) or lmpress's kernel: the same numbers
def test_int8_dynamic_module_matches_its_emulation(native, monkeypatch):
    torch.manual_seed(2)
    monkeypatch.setattr(Int8DynamicLinear, "native", native)
    m = Int8DynamicLinear.from_linear(torch.nn.Linear(100, 37))
    for shape in [(1, 100), (1, 1, 100), (4, 100), (2, 3, 100)]:
        x = torch.randn(*shape)
        assert torch.equal(m(x), m.forward_reference(x)), shape


def test_missing_library_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_native", None)
    monkeypatch.setattr(kernels, "_warned", False)
    m = layer(4, 128)
    x = torch.randn(1, 576)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = m(x), m(x)
    assert sum("native kernels not available" in str(w.message) for w in caught) == 1
    assert torch.equal(y1, m.forward_reference(x)) and torch.equal(y2, y1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_greedy_tokens_kernels_on_and_off(family, tokenizer, one_thread, monkeypatch):
    lm = tiny_model(family, tokenizer)
    compress(lm, [RTN(8, None, targets=r"self_attn"), RTN(4, 32)])
    ids = torch.tensor([[1, 47, 300, 12, 99, 5]])

    def greedy():
        with torch.no_grad():
            return lm.model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)

    on = greedy()
    monkeypatch.setattr(kernels, "ENABLED", False)
    off = greedy()
    assert torch.equal(on, off)


# ---- dequantization (the path of inputs with more than MAX_ROWS rows): bit for bit the torch reference ----------

DQ_SHAPES = [(37, 576, 128), (33, 100, None), (5, 40, 32), (7, 77, 24), (64, 576, 64), (3, 1, None), (130, 97, 96)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", DQ_SHAPES)
def test_dequantize_equals_the_reference(shape, bits, symmetric):
    from lmpress.quant.primitives import QParams, dequantize, unpack
    from lmpress.nn.packed import pad_to_groups

    out_f, in_f, group = shape
    qw, scales, zeros = packed(out_f, in_f, bits, group, symmetric, seed=bits)
    codes = pad_to_groups(unpack(qw, bits, in_f), group)
    qp = QParams(scales.t().float(), zeros.t().float(), bits, group)
    r = dequantize(codes, qp)[:, :in_f]
    for isa in ISAS:
        for t in (1, 2):
            y = kernels.dequantize_packed(qw, scales, zeros, bits, group, in_f, isa=isa, threads=t)
            assert y.shape == (out_f, in_f) and torch.equal(y, r), (isa, t)
    # float32 parameters (a model cast with .float()), no zeros, and a caller's buffer larger than needed
    y = kernels.dequantize_packed(qw, scales.float(), zeros.float(), bits, group, in_f)
    assert torch.equal(y, r)
    r0 = dequantize(codes, QParams(qp.scale, torch.zeros_like(qp.zero), bits, group))[:, :in_f]
    buf = torch.full((out_f * in_f + 5,), float("nan"))
    for isa in ISAS:
        assert torch.equal(kernels.dequantize_packed(qw, scales, None, bits, group, in_f, out=buf, isa=isa), r0)
    assert buf[out_f * in_f:].isnan().all()  # nothing written past the weight


def test_dequantize_threads_and_bad_arguments():
    qw, scales, zeros = packed(1001, 320, 4, 64, False)
    one = kernels.dequantize_packed(qw, scales, zeros, 4, 64, 320, threads=1)
    for t in (2, 3):
        assert torch.equal(kernels.dequantize_packed(qw, scales, zeros, 4, 64, 320, threads=t), one)
    with pytest.raises(ValueError):
        kernels.dequantize_packed(qw, scales, zeros, 4, 64, 321)              # row bytes do not fit
    with pytest.raises(ValueError):
        kernels.dequantize_packed(qw, scales[:2], zeros[:2], 4, 64, 320)      # wrong number of groups
    with pytest.raises(ValueError):
        kernels.dequantize_packed(qw, scales, zeros, 4, 64, 320, out=torch.empty(10))


def test_scratch_is_reused_and_released():
    kernels.release_scratch()
    a = kernels.scratch(100)
    assert kernels.scratch(50) is a and a.numel() == 100
    b = kernels.scratch(200)
    assert b.numel() == 200 and kernels.scratch(10) is b
    kernels.release_scratch()


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, False), (4, 128, True), (4, 32, False), (4, None, True),
                                                   (8, 64, False), (8, None, True), (3, 64, False), (2, 32, True),
                                                   (4, 48, False), (3, 36, False)])
def test_packed_linear_many_rows_equals_the_reference(bits, group, symmetric, monkeypatch):
    # inputs of more than MAX_ROWS rows (and any rows for widths / groups without a GEMV kernel) take the native
    # dequantization then torch's matmul: the same numbers as forward_reference, bit for bit
    m = layer(bits, group, symmetric)
    assert isinstance(m, PackedLinear)
    small = (m.bits not in m.native_bits or not kernels.group_ok(group, m.in_features)) \
        and not kernels.lowbit_ok(bits, group, m.in_features)
    rows = [1, 5, 16, 17, 64, 600] if small else [17, 64, 600]
    for isa in ISAS:
        monkeypatch.setattr(kernels, "ISA_CAP", isa)
        for n in rows:
            x = torch.randn(n, 576)
            assert torch.equal(m(x), m.forward_reference(x)), (isa, n)
        x3 = torch.randn(2, 40, 576)
        assert torch.equal(m(x3), m.forward_reference(x3))
    monkeypatch.setattr(kernels, "ISA_CAP", None)
    # the scratch buffer is reused across layers: a second layer in between leaves the first's result intact
    other = layer(4, 32, in_f=576, out_f=300)
    x = torch.randn(20, 576)
    y1 = m(x)
    other(x)
    assert torch.equal(y1, m.forward_reference(x)) and torch.equal(m(x), y1)
    # the library missing or switched off: the torch reference, same numbers
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(m(x), y1)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_native", None)
    monkeypatch.setattr(kernels, "_warned", True)
    assert torch.equal(m(x), y1)


def test_packed_linear_many_rows_gradient_and_written_buffers():
    m = layer(4, 128)
    x = torch.randn(20, 576, requires_grad=True)
    y = m(x)
    y.sum().backward()  # the reference path (the weight must outlive the call for the backward)
    assert x.grad is not None and torch.equal(y, m.forward_reference(x))
    xs = torch.randn(20, 576)
    before = m(xs)
    m.scales.mul_(2)    # written in place: the cached kernel arguments are derived again
    assert torch.equal(m(xs), m.forward_reference(xs)) and not torch.equal(m(xs), before)


def test_torch_on_one_thread_keeps_the_kernels_threads_and_restores_both():
    before_torch, before = torch.get_num_threads(), kernels._threads
    try:
        torch.set_num_threads(2)
        kernels.set_num_threads(None)  # the kernels follow torch: 2
        with kernels.torch_on_one_thread():
            assert torch.get_num_threads() == 1 and kernels.get_num_threads() == 2
        assert torch.get_num_threads() == 2 and kernels._threads is None
        with pytest.raises(RuntimeError), kernels.torch_on_one_thread():
            raise RuntimeError("restored on the way out too")
        assert torch.get_num_threads() == 2 and kernels._threads is None
    finally:
        torch.set_num_threads(before_torch)
        kernels.set_num_threads(before)
