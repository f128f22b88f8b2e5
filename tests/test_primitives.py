"""Quantization primitives: hand-computed grids, code ranges, bit-exact packing, SQNR bounds, clipping."""

import math

import pytest
import torch

from lmpress.errors import BadInput
from lmpress.quant.primitives import (QParams, check_bits, check_group, compute_qparams, dequantize,
                                      fake_quantize, pack, packed_row_bytes, quantize, quantize_weight,
                                      relative_error, sqnr_db, unpack)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

def gaussian(O=256, I=512, seed=0):
    return torch.randn(O, I, generator=torch.Generator().manual_seed(seed))


def heavy_tailed(O=64, I=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, I, generator=g)
    chi2 = torch.randn(O, I, 4, generator=g).pow(2).sum(-1)  # Student-t with 4 degrees of freedom
    return w / (chi2 / 4).sqrt()


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------- hand-computed grids

def test_symmetric_4bit_hand_example():
    w = T([[-1.4, -0.2, 0.0, 0.6, 1.4]])
    codes, qp = quantize_weight(w, bits=4)
    assert qp.scale.shape == (1, 1) and qp.scale.item() == pytest.approx(0.2)
    assert qp.zero.item() == 8
    assert codes.dtype == torch.uint8 and codes.tolist() == [[1, 7, 8, 11, 15]]
    assert torch.allclose(dequantize(codes, qp), w, atol=1e-6)


def test_symmetric_ties_round_half_to_even():
    w = T([[-3.5, -1.0, 0.0, 0.25, 0.75, 3.5]])  # scale 0.5: w/scale = -7, -2, 0, 0.5, 1.5, 7
    codes, qp = quantize_weight(w, bits=4)
    assert qp.scale.item() == 0.5
    assert codes.tolist() == [[1, 6, 8, 8, 10, 15]]
    assert dequantize(codes, qp).tolist() == [[-3.5, -1.0, 0.0, 0.0, 1.0, 3.5]]


def test_asymmetric_2bit_hand_example():
    w = T([[-0.5, 0.0, 0.25, 1.0]])  # scale 1.5/3 = 0.5, zero round(0.5/0.5) = 1
    codes, qp = quantize_weight(w, bits=2, symmetric=False)
    assert qp.scale.item() == 0.5 and qp.zero.item() == 1
    assert codes.tolist() == [[0, 1, 1, 3]]  # 0.25/0.5 = 0.5 rounds to 0 (ties to even)
    assert dequantize(codes, qp).tolist() == [[-0.5, 0.0, 0.0, 1.0]]


def test_asymmetric_3bit_hand_example():
    w = T([[-1.0, -0.5, 0.25, 1.0, 2.5]])  # scale 3.5/7 = 0.5, zero round(1.0/0.5) = 2
    codes, qp = quantize_weight(w, bits=3, symmetric=False)
    assert qp.scale.item() == 0.5 and qp.zero.item() == 2
    assert codes.tolist() == [[0, 1, 2, 4, 7]]
    assert dequantize(codes, qp).tolist() == [[-1.0, -0.5, 0.0, 1.0, 2.5]]


def test_groups_run_along_the_input_dimension():
    w = T([[1.0, -2.0, 0.5, 0.25],
           [-4.0, 4.0, 7.0, 0.0]])
    qp = compute_qparams(w, bits=4, group_size=2)  # qmax 7: scale = max|group| / 7
    assert qp.group_size == 2 and qp.scale.shape == (2, 2) and qp.zero.shape == (2, 2)
    assert torch.allclose(qp.scale, T([[2.0, 0.5], [4.0, 7.0]]) / 7)
    assert torch.equal(qp.zero, torch.full((2, 2), 8.0))


def test_zero_point_outside_code_range_for_one_signed_groups():
    pos = T([[1.0, 2.0, 3.0, 4.0]])
    codes, qp = quantize_weight(pos, bits=2, symmetric=False)
    assert qp.scale.item() == 1.0 and qp.zero.item() == -1  # not clamped to [0, 3]
    assert codes.tolist() == [[0, 1, 2, 3]] and torch.equal(dequantize(codes, qp), pos)
    neg = -pos.flip(1)
    codes, qp = quantize_weight(neg, bits=2, symmetric=False)
    assert qp.zero.item() == 4 and codes.tolist() == [[0, 1, 2, 3]] and torch.equal(dequantize(codes, qp), neg)


# ------------------------------------------------------------------------------------ ranges and guards

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_codes_stay_in_range(bits, symmetric, clip):
    w = heavy_tailed(16, 64)
    if not symmetric:
        w = w.abs() + 0.5  # min-max on all-positive groups
    codes, qp = quantize_weight(w, bits, group_size=16, symmetric=symmetric, clip=clip)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= 2**bits - 1
    if symmetric:  # the symmetric grid never uses code 0
        assert int(codes.min()) >= 1 and torch.equal(qp.zero, torch.full_like(qp.zero, 2 ** (bits - 1)))
    else:
        # every group is positive, so no zero-point lies above code 0 and most lie below the code range
        assert (qp.zero <= 0).all() and (qp.zero < 0).float().mean() > 0.5
    assert (qp.scale > 0).all() and qp.scale.dtype == qp.zero.dtype == torch.float32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_all_zero_groups_dequantize_to_zero(symmetric, clip):
    w = gaussian(4, 64)
    w[1] = 0.0  # a whole row
    w[2, 32:] = 0.0  # one group
    for group_size, per_tensor in [(32, False), (None, False)]:
        codes, qp = quantize_weight(w, 4, group_size, symmetric=symmetric, clip=clip, per_tensor=per_tensor)
        out = dequantize(codes, qp)
        assert torch.isfinite(qp.scale).all() and torch.isfinite(qp.zero).all() and (qp.scale > 0).all()
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[2, 32:] == 0).all()
        assert (qp.scale.half() > 0).all()  # the guard scale survives the caller's fp16 cast
    zero = torch.zeros(3, 8)
    assert torch.equal(fake_quantize(zero, compute_qparams(zero, 3, symmetric=symmetric, per_tensor=True)), zero)


def test_constant_group_min_max_dequantizes_to_itself():
    w = T([[0.3, 0.3, 0.3, 0.3], [-2.0, -2.0, -2.0, -2.0]])
    out = fake_quantize(w, compute_qparams(w, 4, symmetric=False))
    assert torch.allclose(out, w, atol=1e-6)


def test_int8_symmetric_never_overflows_a_signed_byte():
    w = gaussian(64, 256)
    w[:, 0] = w.abs().amax(dim=1)  # the maximum sits exactly at +max|w| in every row ...
    w[:, 1] = -w[:, 0]  # ... and at -max|w|
    codes, qp = quantize_weight(w, 8)
    assert int(codes.min()) == 1 and int(codes.max()) == 255
    signed = codes.to(torch.int16) - 128
    assert int(signed.min()) == -127 and int(signed.max()) == 127
    # the classic round(W·255/max(W)) recipe would reach 255, which wraps around in a signed byte
    naive = torch.round(w * 255 / w.abs().amax(dim=1, keepdim=True))
    assert int(naive.max()) == 255 > torch.iinfo(torch.int8).max


def test_per_tensor_has_one_scale():
    w = gaussian(32, 64)
    qp = compute_qparams(w, 4, per_tensor=True)
    assert qp.scale.shape == (32, 1) and qp.group_size is None
    assert qp.scale.unique().numel() == 1 and qp.scale[0, 0].item() == pytest.approx(w.abs().max().item() / 7)
    qpa = compute_qparams(w, 4, symmetric=False, per_tensor=True)
    assert qpa.scale.unique().numel() == 1 and qpa.zero.unique().numel() == 1


def test_fake_quantize_is_dequantize_of_quantize():
    w = gaussian(32, 128)
    for bits, g, sym in [(4, 32, True), (3, 64, False), (8, None, True)]:
        qp = compute_qparams(w, bits, g, symmetric=sym)
        assert torch.equal(fake_quantize(w, qp), dequantize(quantize(w, qp), qp))
    wb = w.bfloat16()
    qp = compute_qparams(wb, 4, 32)
    out = fake_quantize(wb, qp)
    assert out.dtype == torch.bfloat16 and torch.equal(out, dequantize(quantize(wb, qp), qp).bfloat16())
    # and it really moves values onto the grid: 4-bit per group has at most 15 distinct values per group
    assert all(row.unique().numel() <= 15 for row in fake_quantize(w, compute_qparams(w, 4, 32)).reshape(-1, 32))


# ---------------------------------------------------------------------------------------------- packing

def reference_bitstream(codes, bits, nbytes):
    """Slow per-bit reference of the documented layout: column c at bits c·b .. c·b+b-1 of each row."""
    out = []
    for row in codes.tolist():
        stream = 0
        for c, v in enumerate(row):
            stream |= v << (c * bits)
        out.append(list(stream.to_bytes(nbytes, "little")))
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("I", [1, 3, 7, 8, 13, 64, 130])
def test_pack_unpack_bit_exact(bits, I):
    g = torch.Generator().manual_seed(bits * 1000 + I)
    codes = torch.randint(0, 2**bits, (5, I), generator=g, dtype=torch.uint8)
    codes[0] = 2**bits - 1  # every bit set in one row
    packed = pack(codes, bits)
    expected_bytes = 3 * math.ceil(I / 8) if bits == 3 else math.ceil(I * bits / 8)
    assert packed.dtype == torch.uint8 and packed.shape == (5, expected_bytes) == (5, packed_row_bytes(I, bits))
    assert packed.tolist() == reference_bitstream(codes, bits, expected_bytes)
    assert torch.equal(unpack(packed, bits, I), codes)


def test_pack_hand_examples():
    # 4 bits: column 2j in the low nibble, 2j+1 in the high one; the odd last byte is zero-padded
    assert pack(torch.tensor([[1, 2, 3, 15, 7]], dtype=torch.uint8), 4).tolist() == [[0x21, 0xF3, 0x07]]
    # 2 bits: column 4j+k at bit 2k
    assert pack(torch.tensor([[3, 0, 1, 2, 1]], dtype=torch.uint8), 2).tolist() == [[0x93, 0x01]]
    # 3 bits: 8 columns per 3 bytes; 1,2,3,4,5,6,7,0 -> 24-bit word 0x1F58D1 (little-endian D1 58 1F),
    # and a 9th column starts a new, zero-padded 3-byte word
    packed = pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 5]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[0xD1, 0x58, 0x1F, 0x05, 0x00, 0x00]]
    # 5 bits: generic bitstream, 31 then 1 -> 0b1_11111 = 0x3F, then bits 8..9 are 0
    assert pack(torch.tensor([[31, 1]], dtype=torch.uint8), 5).tolist() == [[0x3F, 0x00]]
    # rows are independent: each row starts on a byte boundary
    two_rows = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    assert pack(two_rows, 4).tolist() == [[0x21, 0x03], [0x54, 0x06]]


def test_pack_rejects_codes_out_of_range_and_bad_shapes():
    with pytest.raises(BadInput):
        pack(torch.tensor([[16, 0]], dtype=torch.uint8), 4)
    with pytest.raises(BadInput):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)  # 8 codes at 4 bits need 4 bytes


def test_packed_weight_round_trip_dequantizes_identically():
    w = gaussian(48, 96)
    for bits in (2, 3, 4, 8):
        codes, qp = quantize_weight(w, bits, group_size=32, symmetric=False)
        assert torch.equal(dequantize(unpack(pack(codes, bits), bits, 96), qp), dequantize(codes, qp))


# ------------------------------------------------------------------------------------------- SQNR bounds

# measured on gaussian(256, 512) seed 0 (sym / min-max): 8-bit per channel 42.6 / 43.2, 4-bit g128 18.6 / 19.9,
# 4-bit g32 20.3 / 21.8, 3-bit g64 12.0 / 14.2, 2-bit g32 3.6 / 7.8; bounds sit 1.5-2 dB below
@pytest.mark.parametrize("bits,group_size,symmetric,bound", [
    (8, None, True, 41.0), (8, None, False, 41.5),
    (4, 128, True, 17.0), (4, 128, False, 18.0),
    (4, 32, True, 18.5), (4, 32, False, 20.0),
    (3, 64, True, 10.5), (3, 64, False, 12.5),
    (2, 32, True, 2.0), (2, 32, False, 6.0),
])
def test_sqnr_bounds_on_gaussian_weights(bits, group_size, symmetric, bound):
    w = gaussian()
    s = sqnr_db(w, fake_quantize(w, compute_qparams(w, bits, group_size, symmetric=symmetric)))
    # about 6.02 dB per bit; never above the ideal uniform quantizer of a bounded signal
    assert bound < s < 6.02 * bits + 6


@pytest.mark.parametrize("symmetric", [True, False])
def test_smaller_groups_are_never_worse(symmetric):
    w = gaussian()
    s = {g: sqnr_db(w, fake_quantize(w, compute_qparams(w, 4, g, symmetric=symmetric))) for g in (32, 128, None)}
    assert s[32] >= s[128] >= s[None]


def test_sqnr_on_real_stories_weights(stories):
    # measured (4-bit, layers 0-4): q_proj g32 20.4-21.1 sym / 21.7-22.4 min-max; down_proj (in 172) g43 19.6-19.7
    # sym, per channel 17.9-18.2 sym / 19.2-19.5 min-max
    for layer in stories.model.model.layers:
        q = layer.self_attn.q_proj.weight.detach()
        s32 = sqnr_db(q, fake_quantize(q, compute_qparams(q, 4, 32)))
        assert s32 > 18.5
        assert sqnr_db(q, fake_quantize(q, compute_qparams(q, 4, 32, symmetric=False))) > 20.0
        assert s32 >= sqnr_db(q, fake_quantize(q, compute_qparams(q, 4, None)))

        down = layer.mlp.down_proj.weight.detach()
        assert down.shape[1] == 172
        assert sqnr_db(down, fake_quantize(down, compute_qparams(down, 4, 43))) > 18.0
        assert sqnr_db(down, fake_quantize(down, compute_qparams(down, 4, None))) > 16.5
        assert sqnr_db(down, fake_quantize(down, compute_qparams(down, 4, None, symmetric=False))) > 17.5
        with pytest.raises(BadInput, match="172"):
            compute_qparams(down, 4, 32)


def test_error_metrics():
    ref = T([[3.0, 4.0]])
    assert sqnr_db(ref, ref) == math.inf and relative_error(ref, ref) == 0.0
    approx = T([[3.0, 3.0]])  # noise 1, signal 25
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(25))
    assert relative_error(ref, approx) == pytest.approx(1 / 5)


# ---------------------------------------------------------------------------------------------- clipping

def group_sse(w, qp, g):
    return (fake_quantize(w, qp) - w).pow(2).reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (4, False), (8, True)])
def test_clip_never_increases_error(bits, symmetric):
    for w in (gaussian(64, 256, seed=1), heavy_tailed()):
        plain = compute_qparams(w, bits, 64, symmetric=symmetric)
        clipped = compute_qparams(w, bits, 64, symmetric=symmetric, clip=True)
        assert (group_sse(w, clipped, 64) <= group_sse(w, plain, 64)).all()  # group by group
        assert (clipped.scale <= plain.scale + 1e-12).all()  # it only ever shrinks the range


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_helps_on_heavy_tailed_weights(symmetric):
    # measured on heavy_tailed() g128 (sym / min-max): 3-bit 7.8 -> 10.2 / 10.4 -> 11.7 dB; 4-bit 14.7 -> 15.6 /
    # 16.9 -> 17.3 dB
    w = heavy_tailed()
    for bits, gain in [(3, 1.0), (4, 0.2)]:
        plain = sqnr_db(w, fake_quantize(w, compute_qparams(w, bits, 128, symmetric=symmetric)))
        clipped = sqnr_db(w, fake_quantize(w, compute_qparams(w, bits, 128, symmetric=symmetric, clip=True)))
        assert clipped > plain + gain


# -------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bits", [1, 9, 2.5, 0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(BadInput, match="bits"):
        check_bits(bits)
    with pytest.raises(BadInput):
        quantize_weight(gaussian(4, 32), bits)


def test_bad_group_size():
    w = gaussian(8, 256)
    with pytest.raises(BadInput, match="in_features=256") as e:
        compute_qparams(w, 4, 100)
    assert "64" in str(e.value) and "None" in str(e.value)  # suggests a divisor and per-channel
    for g in (0, -32, 2.5):
        with pytest.raises(BadInput, match="group_size"):
            check_group(256, g)
    with pytest.raises(BadInput):
        compute_qparams(w, 4, 0)
    with pytest.raises(BadInput):
        compute_qparams(w, 4, 32, per_tensor=True)
    assert check_group(256, None) == 256 and check_group(256, 32) == 32


def test_params_must_fit_the_weight():
    qp = compute_qparams(gaussian(8, 64), 4, 32)
    with pytest.raises(BadInput):
        quantize(gaussian(8, 128), qp)
    with pytest.raises(BadInput):
        QParams(torch.ones(8, 2), torch.ones(8, 3), 4, 32)
