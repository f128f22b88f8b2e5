"""Pruning: masks (prune/masks.py), magnitude, Wanda and SparseGPT, alone and in the sequential engine."""

import copy
from types import SimpleNamespace as NS

import pytest
import torch

import lmpress
from lmpress.calibrate import run_sequential
from lmpress.compress import compress
from lmpress.errors import BadInput
from lmpress.nn import linear_weight
from lmpress.nn.packed import PackedLinear
from lmpress.prune import magnitude, sparsegpt, wanda
from lmpress.prune.masks import (check_sparsity, global_mask, mask_for, n_pruned, nm_mask, parse_pattern,
                                 row_mask)
from lmpress.quant import gptq
from lmpress.quant.primitives import compute_qparams, dequantize
from lmpress.quant.rtn import storage_qparams

from conftest import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def correlated_inputs(n: int, i: int, seed: int, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """X = Z·A [n, i]: a random mixing A makes XᵀX far from diagonal; col_scale makes its diagonal uneven."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g) @ (torch.randn(i, i, generator=g) / i**0.5)
    return x if col_scale is None else x * col_scale


def layer(x: torch.Tensor, out_features: int, seed: int = 0):
    """A linear layer, its Wanda statistics, and its Hessian (two batches each, as the engine feeds them)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], out_features)
    ws, hs = wanda.init_stats(lin), sparsegpt.init_stats(lin)
    for part in (x[: len(x) // 2], x[len(x) // 2:]):
        wanda.update_stats(ws, part)
        sparsegpt.update_stats(hs, part)
    return lin, ws, hs


def out_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float((x.double() @ (w_hat - w).double().t()).pow(2).sum())  # ‖XWᵀ − XŴᵀ‖²


def assert_nm(w: torch.Tensor, n: int, m: int, exact: bool = True):
    """Every group of m consecutive columns of every row has exactly (or at most) n non-zeros; a partial last
    group of r columns min(r, n)."""
    O, I = w.shape
    full = I // m * m
    nz = (w[:, :full] != 0).reshape(O, I // m, m).sum(-1)
    assert (nz == n).all() if exact else (nz <= n).all(), nz
    if full < I:
        nz_last = (w[:, full:] != 0).sum(-1)
        assert (nz_last == min(I - full, n)).all() if exact else (nz_last <= min(I - full, n)).all()


# ------------------------------------------------------------------------------------ masks, validation

def test_patterns_and_sparsity_validation():
    assert parse_pattern(None) is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8 ") == (4, 8) and parse_pattern("1:2") == (1, 2)
    for bad in ("4:2", "2:2", "0:4", "x:y", "2:4:8", "2-4", "", "-1:4", 24, (2, 4)):
        with pytest.raises(BadInput, match="pattern"):
            parse_pattern(bad)
    assert check_sparsity(0) == 0.0 and check_sparsity(0.5) == 0.5
    for bad in (1.0, 1, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(BadInput, match="sparsity"):
            check_sparsity(bad)
    assert n_pruned(0.29, 100) == 29 and n_pruned(0.5, 7) == 3 and n_pruned(0.0, 10) == 0


@pytest.mark.parametrize("shape", [(5, 64), (3, 37), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_row_and_global_masks_exact(shape, sparsity):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0)).abs()
    keep = row_mask(scores, sparsity)
    k = int(sparsity * shape[1] + 1e-6)
    assert ((~keep).sum(1) == k).all()
    # the pruned are the lowest of their row
    for r in range(shape[0]):
        if 0 < k < shape[1]:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    keep = global_mask(scores, sparsity)
    assert int((~keep).sum()) == int(sparsity * scores.numel() + 1e-6)
    if keep.any() and (~keep).any():
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m,I", [(2, 4, 64), (4, 8, 64), (2, 4, 66), (4, 8, 172), (1, 4, 7), (3, 4, 10)])
def test_nm_mask_every_group(n, m, I):
    scores = torch.randn(6, I, generator=torch.Generator().manual_seed(1)).abs()
    keep = nm_mask(scores, n, m)
    assert_nm(keep, n, m)
    full = I // m * m  # in every group the kept are the largest
    g = scores[:, :full].reshape(6, -1, m)
    k = keep[:, :full].reshape(6, -1, m)
    lo_kept = torch.where(k, g, torch.full_like(g, float("inf"))).amin(-1)
    hi_pruned = torch.where(~k, g, torch.full_like(g, -1.0)).amax(-1)
    assert (hi_pruned <= lo_kept).all()
    assert torch.equal(mask_for(scores, 0.123, f"{n}:{m}"), keep)  # the pattern decides, sparsity is ignored


def test_ties_are_deterministic():
    keep = row_mask(torch.ones(2, 6), 0.5)  # all equal: the lower columns go first
    assert keep.tolist() == [[False, False, False, True, True, True]] * 2
    assert nm_mask(torch.ones(1, 8), 2, 4).tolist() == [[False, False, True, True] * 2]


# ------------------------------------------------------------------------------------ magnitude, Wanda

def test_magnitude_in_place_exact_per_row():
    torch.manual_seed(0)
    lin = torch.nn.Linear(50, 12)
    w = lin.weight.detach().clone()
    out = magnitude.prune_magnitude(lin, NS(sparsity=0.5, pattern=None))
    assert out is lin
    zero = lin.weight == 0
    assert (zero.sum(1) == 25).all()
    assert torch.equal(lin.weight[~zero], w[~zero])  # kept weights unchanged
    for r in range(12):
        assert w[r][zero[r]].abs().max() <= w[r][~zero[r]].abs().min()
    magnitude.prune_magnitude(lin := torch.nn.Linear(50, 12), NS(sparsity=0.5, pattern="2:4"))
    assert_nm(lin.weight, 2, 4)


def wanda_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    """The paper's description, one output row (and one N:M group) at a time: score |W_ij|·‖X_j‖₂ with the
    norm over all calibration rows, zero the lowest floor(sparsity·I) of the row (or the M−N lowest of each
    group of M). Returns the pruned weight."""
    w = w.clone()
    norms = torch.linalg.vector_norm(x.double(), dim=0)  # [I]
    O, I = w.shape
    for r in range(O):
        score = w[r].double().abs() * norms
        if nm is None:
            w[r, torch.argsort(score, stable=True)[:int(sparsity * I)]] = 0
        else:
            n, m = nm
            for c in range(0, I, m):
                grp = score[c:c + m]
                w[r, c + torch.argsort(grp, stable=True)[:max(0, len(grp) - n)]] = 0
    return w


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_wanda_equals_row_loop_reference(pattern):
    x = correlated_inputs(300, 100, seed=3, col_scale=torch.logspace(-1, 1, 100))
    lin, ws, _ = layer(x, 24, seed=4)
    ref = wanda_reference(lin.weight.detach(), x, 0.5, parse_pattern(pattern))
    wanda.apply(lin, ws, NS(sparsity=0.5, pattern=pattern))
    assert torch.equal(lin.weight.detach(), ref)
    if pattern:
        assert_nm(lin.weight, *parse_pattern(pattern))
    else:
        assert ((lin.weight == 0).sum(1) == 50).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_beats_magnitude_on_uneven_input_norms(seed):
    """Input norms spread over two decades (shuffled). Measured Wanda / magnitude output error at 50%:
    0.031–0.035 (4 seeds); ~35% of the mask differs."""
    i = 144
    col_scale = torch.logspace(-1, 1, i)[torch.randperm(i, generator=torch.Generator().manual_seed(seed + 10))]
    x = correlated_inputs(2048, i, seed, col_scale)
    lin, ws, _ = layer(x, 64, seed)
    w = lin.weight.detach().clone()
    k_mag = magnitude.magnitude_mask(w, 0.5)
    k_wanda = wanda.wanda_mask(w, wanda.input_norms(ws), 0.5)
    assert (k_mag != k_wanda).float().mean() > 0.2
    e_mag, e_wanda = out_error(w * k_mag, w, x), out_error(w * k_wanda, w, x)
    assert e_wanda < 0.2 * e_mag, (e_wanda, e_mag)


# ------------------------------------------------------------------------------------------- SparseGPT

@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_wanda_and_magnitude(pattern, seed):
    """Correlated inputs, 256 columns (two mask blocks of 128). Measured SparseGPT / Wanda output error:
    unstructured 0.64 (3 seeds), 2:4 0.53–0.57 (6 seeds); Wanda ≈ magnitude here (even input norms)."""
    x = correlated_inputs(4096, 256, seed)
    lin, ws, hs = layer(x, 64, seed)
    w = lin.weight.detach().clone()
    e_mag = out_error(w * magnitude.magnitude_mask(w, 0.5, pattern), w, x)
    e_wanda = out_error(w * wanda.wanda_mask(w, wanda.input_norms(ws), 0.5, pattern), w, x)
    out = sparsegpt.apply(lin, hs, NS(sparsity=0.5, pattern=pattern))
    assert out is lin
    w_hat = lin.weight.detach()
    e_sgpt = out_error(w_hat, w, x)
    assert e_sgpt < 0.8 * min(e_wanda, e_mag), (e_sgpt, e_wanda, e_mag)
    if pattern:
        assert_nm(w_hat, 2, 4)
    else:  # adaptive: exact for the layer, not per row
        assert int((w_hat == 0).sum()) == 64 * 256 // 2
        assert (w_hat == 0).sum(1).float().std() > 0


def reference_sparsegpt(W, H, sparsity, nm, block, bits=None, group=None, damp=0.01):
    """SparseGPT in its OBS form, one column at a time with an explicit inverse Hessian, eliminated column by
    column; no Cholesky factor, no lazy updates. float64; masks and codes chosen on float32 values. Saliency
    of column j: w² / [H⁻¹]_jj at the time j is eliminated (a first pass records those diagonals)."""
    W, H = W.clone().double(), H.clone().double()
    O, I = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(I, dtype=H.dtype))
    d2, Hc = torch.zeros(I, dtype=H.dtype), Hinv.clone()
    for j in range(I):
        d2[j] = Hc[j, j]
        Hc = Hc - Hc[:, j:j + 1] @ Hc[j:j + 1, :] / Hc[j, j]
    keep = torch.ones(O, I, dtype=torch.bool)
    out = torch.zeros(O, I, dtype=torch.float64)
    g = group or I
    for j in range(I):
        if nm is None and j % block == 0 and sparsity > 0:
            j2 = min(j + block, I)
            k = n_pruned(sparsity, O * j2) - n_pruned(sparsity, O * j)
            score = (W[:, j:j2].float() ** 2 / d2[j:j2].float()).flatten()
            blk = keep[:, j:j2].clone().flatten()
            blk[torch.argsort(score, stable=True)[:k]] = False
            keep[:, j:j2] = blk.reshape(O, j2 - j)
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            score = W[:, j:j + m].float() ** 2 / d2[j:j + m].float()
            for r in range(O):
                keep[r, j + torch.argsort(score[r], stable=True)[:max(0, score.shape[1] - n)]] = False
        if bits and j % g == 0:
            wg = (W[:, j:j + g] * keep[:, j:j + g]).float()
            qp = storage_qparams(compute_qparams(torch.cat([wg, torch.zeros(O, 1)], 1), bits, None, symmetric=False))
            s, z = qp.scale[:, 0], qp.zero[:, 0]
        if bits:
            qc = torch.where(keep[:, j], torch.clamp(torch.round(W[:, j].float() / s) + z, 0, 2**bits - 1), z)
            q = ((qc - z) * s).double()
        else:
            q = torch.where(keep[:, j], W[:, j], 0.0)
        out[:, j] = q
        W[:, j:] -= ((W[:, j] - q) / Hinv[j, j])[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return out, keep


@pytest.mark.parametrize("pattern,block,bits,group", [(None, 32, None, None), ("2:4", 128, None, None),
                                                      ("4:8", 16, None, None), (None, 48, 4, 16),
                                                      ("2:4", 32, 3, 32)])
def test_blocked_sparsegpt_equals_column_by_column_reference(pattern, block, bits, group):
    """The same masks (exactly) and weights (to float32 precision) as the OBS reference; 100 columns, so the
    last block, N:M group and quantization group are partial, and a dead input column."""
    x = correlated_inputs(1024, 100, seed=5)
    H = 2 / len(x) * (x.t().double() @ x.double())
    H[:, 7] = H[7, :] = 0
    W = torch.randn(32, 100, generator=torch.Generator().manual_seed(6))
    nm = parse_pattern(pattern)
    r = sparsegpt.sparsegpt_prune(W, H, 0.5, pattern, bits=bits, group_size=group, block_size=block)
    ref_w, ref_keep = reference_sparsegpt(W, H, 0.5, nm, block, bits, group)
    assert torch.equal(r.mask, ref_keep), int((r.mask != ref_keep).sum())
    assert torch.allclose(r.weight.double(), ref_w, rtol=1e-4, atol=1e-4), float((r.weight - ref_w).abs().max())
    assert (r.weight[~r.mask] == 0).all() and (r.weight[:, 7] == 0).all()


def test_sparsegpt_sparsity_zero_changes_nothing():
    x = correlated_inputs(512, 64, seed=0)
    lin, _, hs = layer(x, 16)
    w = lin.weight.detach().clone()
    sparsegpt.apply(lin, hs, NS(sparsity=0.0))
    assert torch.equal(lin.weight.detach(), w)


@pytest.mark.parametrize("pattern,group", [("2:4", 32), (None, None)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("positive", [False, True])
def test_sparsegpt_joint_quant_pruned_weights_decode_to_exact_zero(pattern, group, symmetric, positive):
    """4 bits, 2:4 in groups of 32 on 144 columns (the last group partial), or 50% unstructured per channel.
    positive=True: every weight > 0, so a min-max grid on the weights alone would not contain 0 (its
    zero-point would be negative; per channel, the parameters are chosen before any weight is pruned); the
    pruned weights must still decode to exactly 0. Measured joint / float SparseGPT output error: 1.04–1.05
    (2:4 g32), 1.09–1.23 (unstructured, per channel); kept weights rounded to the zero code: 0–4%."""
    x = correlated_inputs(2048, 144, seed=7)
    lin, _, hs = layer(x, 32, seed=8)
    if positive:
        with torch.no_grad():
            lin.weight.abs_().add_(0.05)
    w = lin.weight.detach().clone()
    cfg = NS(sparsity=0.5, pattern=pattern, bits=4, group_size=group, symmetric=symmetric)
    q = sparsegpt.apply(lin, copy.deepcopy(hs), cfg)
    assert isinstance(q, PackedLinear) and q.bits == 4 and q.group_size == group and q.symmetric == symmetric
    r = sparsegpt.sparsegpt_prune(w, gptq.hessian(hs), 0.5, pattern, 4, group, symmetric)
    deq = q.dequantize()
    assert torch.equal(deq, r.weight)  # what PackedLinear decodes is what the algorithm compensated for
    assert (deq[~r.mask] == 0).all()  # every pruned weight is exactly 0
    assert int((~r.mask).sum()) == 32 * 144 // 2
    if pattern:
        assert_nm(deq, 2, 4, exact=False)  # at most 2 of every 4: a kept weight may round to the zero code
    assert (deq != 0).sum() >= 0.95 * r.mask.sum()
    float_sgpt = sparsegpt.sparsegpt_prune(w, gptq.hessian(hs), 0.5, pattern).weight
    assert out_error(deq, w, x) < (1.2 if pattern else 1.5) * out_error(float_sgpt, w, x)


def test_quantizing_a_pruned_weight_with_its_fixed_mask_keeps_the_zeros():
    """Prune (float 2:4), then quantize at 4 bits g32 with mask = W != 0: every zero stays exactly 0, at an
    output error close to plain GPTQ's on the pruned weight, which loses ~4% of the zeros (measured, 3 seeds:
    fixed mask 4653/5163/4900, GPTQ 4643/5165/4898, joint prune+quantize 4760/5204/4937, float 4541/5067/4772)."""
    x = correlated_inputs(2048, 128, seed=0)
    lin, _, hs = layer(x, 64)
    w, H = lin.weight.detach().clone(), gptq.hessian(hs)
    pruned = sparsegpt.sparsegpt_prune(w, H, 0.5, "2:4").weight
    r = sparsegpt.sparsegpt_prune(pruned, H, 0.9, "1:8", bits=4, group_size=32, mask=pruned != 0)  # ignored
    assert torch.equal(r.mask, pruned != 0) and (r.weight[pruned == 0] == 0).all()
    assert_nm(r.weight, 2, 4, exact=False)
    codes, qp = gptq.gptq_quantize(pruned, H, 4, 32)
    g = dequantize(codes, qp)
    assert ((g != 0) & (pruned == 0)).any()  # why a pruned layer needs the mask
    assert out_error(r.weight, w, x) < 1.05 * out_error(g, w, x)
    codes, qp = gptq.gptq_quantize(pruned, H, 4, 32, keep_zeros=True)  # GPTQ's own way to keep them
    k = dequantize(codes, qp)
    assert (k[pruned == 0] == 0).all()
    assert_nm(k, 2, 4, exact=False)
    assert out_error(k, w, x) < 1.05 * out_error(r.weight, w, x)


def test_recipe_sparsegpt_then_gptq_keeps_the_pattern(stories_dir):
    """The issue's composition [SparseGPT("2:4"), GPTQ(4, g)]: GPTQ (keep_zeros, its default) quantizes the
    pruned layers and every pruned weight still decodes to exactly 0."""
    from lmpress.recipe import GPTQ, SparseGPT

    lm = lmpress.load(stories_dir / "hf")
    batches = calib_batches(lm, n=8, length=64)
    compress(lm, [SparseGPT(pattern="2:4"), GPTQ(bits=4, group_size=32)], data=batches)
    assert_packed_2of4(lm)


# ----------------------------------------------------------------------------------------- the engine

def calib_batches(lm, n=16, length=128):
    """Calibration text sampled from the float model from BOS (seeded): never the evaluation text."""
    from lmpress.quant.qat import sample_batches

    return sample_batches(lm.model, n, length, 8, lm.bos_id, seed=0)


def assert_packed_2of4(lm) -> None:
    """Every block linear a 4-bit PackedLinear whose decoded weight has at most 2 non-zeros in every 4
    columns, and nearly always exactly 2."""
    kept = total = 0
    for name, mod in block_linears(lm).items():
        assert isinstance(mod, PackedLinear) and mod.bits == 4, name
        w = mod.dequantize()
        assert_nm(w, 2, 4, exact=False)
        kept, total = kept + int((w != 0).sum()), total + w.numel()
    assert 0.48 * total < kept <= 0.5 * total


def block_linears(lm) -> dict:
    return {f"model.layers.{i}.{p}": m for i, b in enumerate(lm.arch.block_list(lm.model))
            for p, m in lm.arch.linears(b).items()}


def test_engine_on_stories_wanda_sparsegpt_beat_magnitude(stories_dir, stories_text):
    """50% unstructured and 2:4 on stories260K; calibration: 16 × 128 tokens sampled from the float model;
    evaluation: stories_text (2052 tokens, ctx 256). Measured KLD to the float model:
    50%: magnitude 1.80, Wanda 1.14, SparseGPT 1.04;  2:4: magnitude 3.99, Wanda 2.41, SparseGPT 1.87.
    (SparseGPT at 50% with block_size 16 instead of 128: 0.86 — stories' layers have only 64/172 inputs.)"""
    from lmpress.compress import replace_layers
    from lmpress.eval.kld import kl_divergence

    base = lmpress.load(stories_dir / "hf")
    batches = calib_batches(base)
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    for pattern in (None, "2:4"):
        cfg = NS(sparsity=0.5, pattern=pattern, targets=None, ignore=r"lm_head$")
        kld = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            lm = lmpress.load(stories_dir / "hf")
            if method == "magnitude":
                replace_layers(lm.model, cfg, magnitude.prune_magnitude)
            else:
                info = run_sequential(lm, lm.arch, batches, {"wanda": wanda, "sparsegpt": sparsegpt}[method], cfg)
                assert len(info["layers"]) == 35
            layers = block_linears(lm)
            for name, mod in layers.items():
                assert type(mod) is torch.nn.Linear, name  # pruned layers stay dense
                w = mod.weight.detach()
                if pattern:
                    assert_nm(w, 2, 4)
                elif method == "sparsegpt":  # exact per layer
                    assert int((w == 0).sum()) == w.numel() // 2, name
                else:  # exact per row
                    assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
            assert (lm.model.lm_head.weight != 0).all()  # ignored
            with torch.no_grad():
                assert torch.isfinite(lm.model(ids).logits).all()
            kld[method] = kl_divergence(lm, base, stories_text, ctx=256)["kld"]
        assert kld["wanda"] < 0.8 * kld["magnitude"], (pattern, kld)
        assert kld["sparsegpt"] < kld["wanda"], (pattern, kld)


def test_engine_sparsegpt_2of4_w4_packed_on_stories(stories_dir):
    """Joint 2:4 + 4-bit g32 through the engine: every block linear a PackedLinear whose decoded weight has
    at most 2 non-zeros in every 4 columns, and nearly always exactly 2."""
    lm = lmpress.load(stories_dir / "hf")
    batches = calib_batches(lm, n=8, length=64)
    run_sequential(lm, lm.arch, batches, sparsegpt,
                   NS(sparsity=0.5, pattern="2:4", bits=4, group_size=32, targets=None, ignore=r"lm_head$"))
    assert_packed_2of4(lm)
    with torch.no_grad():
        assert torch.isfinite(lm.model(batches[0]).logits).all()


def test_engine_wanda_on_gpt2_conv1d(tokenizer):
    """GPT-2 stores its linears transposed (Conv1D, [I, O]): the mask is per output row all the same."""
    lm = tiny_model("gpt2", tokenizer)
    batches = [torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))]
    info = run_sequential(lm, lm.arch, batches, wanda, NS(sparsity=0.25, pattern=None))
    assert len(info["layers"]) == 8
    for name in info["layers"]:
        w = linear_weight(lm.model.get_submodule(name))  # [O, I]
        assert ((w == 0).sum(1) == w.shape[1] // 4).all(), name
    lm = tiny_model("gpt2", tokenizer)  # fresh: kept weights already zero at the start of a row stay zero
    info = run_sequential(lm, lm.arch, batches, sparsegpt, NS(sparsity=0.5, pattern="4:8"))
    for name in info["layers"]:
        assert_nm(linear_weight(lm.model.get_submodule(name)), 4, 8)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_input():
    x = correlated_inputs(256, 64, seed=0)
    lin, ws, hs = layer(x, 8)
    for algo_apply in (lambda c: wanda.apply(lin, ws, c), lambda c: sparsegpt.apply(lin, copy.deepcopy(hs), c),
                       lambda c: magnitude.prune_magnitude(lin, c)):
        for s in (1.0, -0.1):
            with pytest.raises(BadInput, match="sparsity"):
                algo_apply(NS(sparsity=s, pattern=None))
        for p in ("4:2", "x:y"):
            with pytest.raises(BadInput, match="pattern"):
                algo_apply(NS(sparsity=0.5, pattern=p))
    with pytest.raises(BadInput, match="Wanda saw no calibration"):
        wanda.apply(lin, wanda.init_stats(lin), NS(sparsity=0.5))
    with pytest.raises(BadInput, match="SparseGPT saw no calibration"):
        sparsegpt.apply(lin, sparsegpt.init_stats(lin), NS(sparsity=0.5))
    bad_w, bad_h = wanda.init_stats(lin), sparsegpt.init_stats(lin)
    wanda.update_stats(bad_w, torch.full((2, 64), float("nan")))
    sparsegpt.update_stats(bad_h, torch.full((2, 64), float("nan")))
    with pytest.raises(BadInput, match="inf or NaN"):
        wanda.apply(lin, bad_w, NS(sparsity=0.5))
    with pytest.raises(BadInput, match="inf or NaN"):
        sparsegpt.apply(lin, bad_h, NS(sparsity=0.5))
    with pytest.raises(BadInput, match="SparseGPT.*does not factor"):
        sparsegpt.sparsegpt_prune(lin.weight, -torch.eye(64))
    with pytest.raises(BadInput, match="bits"):
        sparsegpt.apply(lin, copy.deepcopy(hs), NS(sparsity=0.5, bits=9))
    with pytest.raises(BadInput, match="fixed mask"):
        sparsegpt.sparsegpt_prune(lin.weight, gptq.hessian(hs), mask=torch.ones(8, 63, dtype=torch.bool))
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(BadInput, match="inf or NaN"):
        magnitude.prune_magnitude(lin, NS(sparsity=0.5))
    with pytest.raises(BadInput, match="inf or NaN"):
        wanda.apply(lin, ws, NS(sparsity=0.5))
    with pytest.raises(BadInput, match="inf or NaN"):
        sparsegpt.apply(lin, hs, NS(sparsity=0.5))
