"""AWQ (quant/awq.py) and SmoothQuant (quant/smoothquant.py): exact folding, error against RTN / plain W8A8,
and the engine's prepare_block step (calibrate.py)."""

import dataclasses
from types import SimpleNamespace as NS

import pytest
import torch

import lmpress
from lmpress.calibrate import run_sequential
from lmpress.compress import compress
from lmpress.errors import BadInput
from lmpress.nn import linear_weight
from lmpress.nn.packed import PackedLinear
from lmpress.quant import awq, smoothquant
from lmpress.quant.rtn import quantize_rtn
from lmpress.recipe import AWQ, GPTQ, RTN, SmoothQuant, W8A8Dynamic

from conftest import tiny_model

OUTLIERS = [3, 17, 40]  # hidden channels whose norm weights are scaled ×50: activation outliers


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def with_outliers(lm):
    """Scale a few channels of every block's pre-attention and pre-MLP norm by 50 (in place)."""
    with torch.no_grad():
        for block in lm.arch.block_list(lm.model):
            for path in (lm.arch.attn_norm, lm.arch.mlp_norm):
                lm.arch.get(block, path).weight[OUTLIERS] *= 50
    return lm


def token_batches(n, shape=(4, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, shape, generator=g) for _ in range(n)]


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def inputs_of(lm, path, ids):
    """Inputs [N, I] of block 0's layer at `path`, on ids."""
    mod = lm.arch.get(lm.arch.block_list(lm.model)[0], path)
    seen = []
    h = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        logits(lm, ids)
    finally:
        h.remove()
    return torch.cat(seen)


def tiny_gemma(tokenizer):
    """Gemma's norms scale by (1 + w): the fold must use that form."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms start at w = 0, i.e. scale 1: make them uneven
                p.normal_(0, 0.5)
    return lmpress.wrap(model, tokenizer, name="tiny-gemma")


# ------------------------------------------------------------------------------ folding is exact

@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "gemma"])
def test_folding_random_scales_keeps_logits(tokenizer, family):
    """Every smoothing group of every block takes scales spread over two decades; the logits stay equal.
    Covers RMSNorm (llama, qwen2 with q/k/v biases), LayerNorm with bias and GPT-2's fused Conv1D, OPT's
    v → o, Gemma's (1 + w) norm, and up → down in gated MLPs."""
    lm = tiny_gemma(tokenizer) if family == "gemma" else tiny_model(family, tokenizer)
    ids = token_batches(1, (2, 40))[0]
    before = logits(lm, ids)
    g = torch.Generator().manual_seed(1)
    kinds = set()
    for block in lm.arch.block_list(lm.model):
        for group in smoothquant.smoothing_groups(block, lm.arch):
            width = linear_weight(next(iter(group.members.values()))).shape[1]
            s = torch.exp(torch.empty(width).uniform_(-2.3, 2.3, generator=g))  # 0.1 .. 10
            assert smoothquant.fold_scales(group, s)
            kinds.add("linear" if group.prev_is_linear else "norm")
    after = logits(lm, ids)
    assert rel(after, before) < 1e-5
    assert kinds == ({"norm"} if family in ("gpt2",) else {"norm", "linear"})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_smoothquant_alone_leaves_model_unchanged(tokenizer, family):
    """SmoothQuant only smooths: the float model computes the same (relative 1e-5), though its norms and
    weights changed, and every layer stays float."""
    lm = with_outliers(tiny_model(family, tokenizer))
    norm0 = lm.model.model.layers[0].input_layernorm.weight.clone()
    ids = token_batches(1, (2, 48), seed=5)[0]
    before = logits(lm, ids)
    info = run_sequential(lm, lm.arch, token_batches(2), smoothquant, SmoothQuant(alpha=0.5))
    assert len(info["layers"]) == 2 * 7
    assert rel(logits(lm, ids), before) < 1e-5
    assert not torch.allclose(lm.model.model.layers[0].input_layernorm.weight, norm0)
    assert all(isinstance(lm.model.get_submodule(n), torch.nn.Linear) for n in info["layers"])


@pytest.mark.parametrize("duo", [False, True])
def test_awq_scale_only_keeps_logits_then_gptq_quantizes(tokenizer, duo):
    """AWQ(scale_only=True) folds its searched scales and leaves the model float (same logits); a GPTQ step
    after it then quantizes the scaled layers: the issue's [AWQ, GPTQ] composition. Also with duo scaling."""
    lm = with_outliers(tiny_model("llama", tokenizer))
    ids = token_batches(1, (2, 48), seed=5)[0]
    before = logits(lm, ids)
    compress(lm, [AWQ(bits=4, group_size=32, scale_only=True, duo_scaling=duo)], data=token_batches(2),
             round_floats=False)
    assert rel(logits(lm, ids), before) < 1e-5
    assert lm.model.model.layers[0].input_layernorm.weight[OUTLIERS].abs().max() < 50  # scales were folded
    compress(lm, [GPTQ(bits=4, group_size=32)], data=token_batches(2))
    assert isinstance(lm.model.model.layers[1].mlp.down_proj, PackedLinear)


# ----------------------------------------------------------------------------------------- SmoothQuant

def test_smoothquant_reduces_channel_imbalance(tokenizer):
    """The inputs of q_proj and gate_proj with outlier channels: max over channels of max|X_j| against their
    median. Measured: q_proj 63 → 8.1, gate_proj 63 → 7.6 (α = 0.5)."""
    lm = with_outliers(tiny_model("llama", tokenizer))
    ids = token_batches(1, seed=7)[0]

    def imbalance():
        out = {}
        for path in ("self_attn.q_proj", "mlp.gate_proj"):
            amax = inputs_of(lm, path, ids).abs().amax(dim=0)
            out[path] = float(amax.max() / amax.median())
        return out

    before = imbalance()
    run_sequential(lm, lm.arch, token_batches(2), smoothquant, SmoothQuant(alpha=0.5))
    after = imbalance()
    for path in before:
        assert before[path] > 20 and after[path] < before[path] / 3, (before, after)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_smoothquant_then_w8a8_beats_w8a8_on_outliers(tokenizer, family):
    """Logits' relative error to float on held-out tokens. Measured (model seeds 0–2, llama and qwen2): W8A8
    dynamic 0.108–0.151; SmoothQuant(0.5) first 0.041–0.064 (ratio 0.37–0.42); with alpha_search
    0.041–0.064 (its int8 simulation is symmetric per token, the kernel's grid is not: not always better)."""
    ids = token_batches(1, seed=9)[0]
    base = with_outliers(tiny_model(family, tokenizer))
    ref = logits(base, ids)
    errs = {}
    for name, recipe in (("w8a8", [W8A8Dynamic()]), ("sq", [SmoothQuant(alpha=0.5), W8A8Dynamic()]),
                         ("sq-search", [SmoothQuant(alpha_search=True), W8A8Dynamic()])):
        lm = with_outliers(tiny_model(family, tokenizer))
        compress(lm, recipe, data=token_batches(2))
        errs[name] = rel(logits(lm, ids), ref)
    assert errs["sq"] < 0.55 * errs["w8a8"], errs
    assert errs["sq-search"] < 0.55 * errs["w8a8"], errs


def test_smoothquant_scales_formula():
    """s_j = max|X_j|^α / max|W_j|^(1−α); with α = 1 the smoothed input's channel maxima are all 1."""
    amax, wmax = torch.tensor([4.0, 0.25, 1.0]), torch.tensor([1.0, 4.0, 0.0])
    s = smoothquant.smoothing_scales(amax, wmax, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.25]))
    assert torch.isfinite(s).all() and (s > 0).all()  # a zero weight column: floored, finite
    assert torch.allclose(amax / smoothquant.smoothing_scales(amax, wmax, 1.0), torch.ones(3))


# ------------------------------------------------------------------------------------------------ AWQ

def correlated_inputs(n, i, seed):
    """X = Z·A with uneven channel magnitudes (3 decades) and a few channels 20× larger still."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g) @ (torch.randn(i, i, generator=g) / i**0.5)
    x = x * torch.logspace(-1.5, 1.5, i)[torch.randperm(i, generator=g)]
    x[:, torch.randperm(i, generator=g)[:4]] *= 20
    return x


def awq_layer(lin, x, bits, group, clip):
    """AWQ on one layer whose input is x: the searched s folded by hand (x/s), then apply; returns the
    quantized layer's outputs on x and the chosen α."""
    stats = awq.update_stats(awq.init_stats(lin), x)
    s, alpha, _ = awq.search_scale([lin.weight.detach()], awq.gram(stats), (stats["absum"] / stats["n"]).float(),
                                   bits, group, 20)
    scaled = torch.nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        scaled.weight.copy_(lin.weight * s)
        scaled.bias.copy_(lin.bias)
    stats = {**awq.update_stats(awq.init_stats(scaled), x / s), "prepared": True}  # as prepare_block leaves it
    q = awq.apply(scaled, stats, NS(bits=bits, group_size=group, clip=clip))
    assert isinstance(q, PackedLinear) and q.bits == bits and q.group_size == group
    with torch.no_grad():
        return q(x / s), alpha


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (3, None)])
def test_awq_layer_error_below_rtn(bits, group):
    """Output error ‖XWᵀ − XŴᵀ‖² on the calibration inputs, AWQ / RTN. Measured on this seed: W4 g32 0.24
    (0.18 with clipping), W3 g32 0.30 (0.24), W3 per channel 0.50 (0.37); over 4 seeds 0.22–0.43, 0.21–0.63
    and 0.33–0.93. 144 inputs: the last group of 32 is partial (padded)."""
    x = correlated_inputs(2048, 144, seed=10 * bits)
    torch.manual_seed(0)
    lin = torch.nn.Linear(144, 64)
    with torch.no_grad():
        ref = lin(x)
        e_rtn = float((quantize_rtn(lin, NS(bits=bits, group_size=group, symmetric=False, clip=False))(x) - ref)
                      .pow(2).sum())
    out, alpha = awq_layer(lin, x, bits, group, clip=False)
    e_awq = float((out - ref).pow(2).sum())
    out_clip, _ = awq_layer(lin, x, bits, group, clip=True)
    e_clip = float((out_clip - ref).pow(2).sum())
    assert alpha > 0 and e_awq < 0.7 * e_rtn, (alpha, e_awq, e_rtn)
    assert e_clip <= e_awq * (1 + 1e-4), (e_clip, e_awq)  # the clip search never raises the output error


def test_awq_search_includes_rtn():
    """α = 0 is s = 1, plain RTN: the search's best error is never above RTN's."""
    x = correlated_inputs(512, 64, seed=3)
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    stats = awq.update_stats(awq.init_stats(torch.nn.Linear(64, 32)), x)
    H, mean = awq.gram(stats), (stats["absum"] / stats["n"]).float()
    s, alpha, errs = awq.search_scale([w], H, mean, 4, 32, 10)
    assert len(errs) == 10 and min(errs) == errs[int(round(alpha * 10))] <= errs[0]
    assert errs[0] == pytest.approx(awq.output_error(w - awq.fake_rtn(w, 4, 32), H), rel=1e-6)


def test_awq_statistics_follow_the_fold(tokenizer):
    """After prepare_block, each layer's statistics (what the clip search uses) are those of its new inputs
    X/s: equal to the Gram matrix and mean|x| observed on the scaled (still float) model."""
    lm = with_outliers(tiny_model("llama", tokenizer))
    batches = token_batches(2)
    seen = {}

    def apply(mod, stats, config):
        seen[mod] = stats
        return awq.apply(mod, stats, config)

    algo = NS(init_stats=awq.init_stats, update_stats=awq.update_stats, prepare_block=awq.prepare_block,
              apply=apply)
    run_sequential(lm, lm.arch, batches, algo, AWQ(bits=4, group_size=32, scale_only=True))
    block = lm.arch.block_list(lm.model)[0]
    alphas = set()
    for path in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        x = torch.cat([inputs_of(lm, path, b) for b in batches])  # block 0's inputs on the finished model
        st = seen[lm.arch.get(block, path)]
        alphas.add(st.get("alpha"))
        assert torch.allclose(awq.gram(st), x.t() @ x / len(x), rtol=1e-3, atol=1e-5), path
        assert torch.allclose((st["absum"] / st["n"]).float(), x.abs().mean(dim=0), rtol=1e-3, atol=1e-6), path
    assert None not in alphas and max(alphas) > 0  # the groups were scaled


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_model_error_below_rtn_on_outliers(tokenizer, bits):
    """Tiny llama (random weights) with outlier channels, group 32: logits' relative error to float on
    held-out tokens. Measured on model seeds 0–2: W4 AWQ 0.16–0.24 vs RTN 0.30–0.42 (ratio 0.52–0.65), W3
    0.31–0.40 vs 0.63–0.65 (0.49–0.63); without clipping AWQ is 8–30% worse than with it."""
    ids = token_batches(1, seed=11)[0]
    ref = logits(with_outliers(tiny_model("llama", tokenizer)), ids)
    lm = with_outliers(tiny_model("llama", tokenizer))
    compress(lm, [AWQ(bits=bits, group_size=32)], data=token_batches(2))
    r = with_outliers(tiny_model("llama", tokenizer))
    compress(r, [RTN(bits=bits, group_size=32)])
    e_awq, e_rtn = rel(logits(lm, ids), ref), rel(logits(r, ids), ref)
    assert e_awq < 0.75 * e_rtn, (e_awq, e_rtn)


def test_awq_w4g32_beats_rtn_kld_on_stories(stories, stories_dir, stories_text):
    """Calibration: 16 × 128 tokens sampled from the float model (seed 0); evaluation: stories_text (2052
    tokens, ctx 256), a different text. Measured KLD: AWQ 0.024 (0.036 without clipping), RTN 0.054, GPTQ 0.029;
    top-1 agreement 0.97 vs 0.91. (On 32 × 256 held-out sequences sampled with another seed: AWQ 0.063, RTN
    0.087, GPTQ 0.060.)"""
    from lmpress.eval.kld import kl_divergence
    from lmpress.quant.qat import sample_batches

    batches = sample_batches(stories.model, 16, 128, 8, stories.bos_id, seed=0)
    lm = lmpress.load(stories_dir / "hf")
    compress(lm, [AWQ(bits=4, group_size=32)], data=batches)
    for block in lm.arch.block_list(lm.model):
        for path, mod in lm.arch.linears(block).items():
            assert isinstance(mod, PackedLinear) and mod.bits == 4 and mod.group_size == 32, path
    assert isinstance(lm.model.lm_head, torch.nn.Linear)
    r = lmpress.load(stories_dir / "hf")
    compress(r, [RTN(bits=4, group_size=32)])
    k_awq = kl_divergence(lm, stories, stories_text, ctx=256)["kld"]
    k_rtn = kl_divergence(r, stories, stories_text, ctx=256)["kld"]
    assert k_awq < 0.7 * k_rtn, (k_awq, k_rtn)


# ------------------------------------------------------------------------------------------ bad input

def test_bad_config():
    for alpha in (-0.1, 1.5, True, "x", None):
        with pytest.raises(BadInput, match="alpha"):
            SmoothQuant(alpha=alpha)
        with pytest.raises(BadInput, match="alpha"):
            smoothquant.check_config(NS(alpha=alpha))
    for grid in (0, -3, 2.5, True):
        with pytest.raises(BadInput, match="grid"):
            AWQ(grid=grid)
        with pytest.raises(BadInput, match="grid"):
            awq.check_config(NS(bits=4, group_size=32, grid=grid))
    with pytest.raises(BadInput, match="bits"):
        AWQ(bits=9)
    for name in ("clip", "scale_only", "duo_scaling"):
        with pytest.raises(BadInput, match=f"AWQ {name} must be true or false"):
            AWQ(**{name: "yes"})
    assert SmoothQuant(alpha=1).alpha == 1.0 and AWQ(grid=1).grid == 1


def test_bad_stats_and_a_misdescribed_family(tokenizer):
    lin = torch.nn.Linear(64, 8)
    cfg = NS(bits=4, group_size=32, clip=True)
    with pytest.raises(BadInput, match="prepare_block"):  # an engine that skips prepare_block: loud, not RTN
        awq.apply(lin, awq.update_stats(awq.init_stats(lin), torch.randn(4, 64)), cfg)
    with pytest.raises(BadInput, match="prepare_block"):
        smoothquant.apply(lin, smoothquant.update_stats(smoothquant.init_stats(lin), torch.randn(4, 64)), NS())
    with pytest.raises(BadInput, match="no calibration inputs"):
        awq.apply(lin, {**awq.init_stats(lin), "prepared": True}, cfg)
    bad = {**awq.update_stats(awq.init_stats(lin), torch.full((2, 64), float("nan"))), "prepared": True}
    with pytest.raises(BadInput, match="inf or NaN"):
        awq.apply(lin, bad, cfg)
    lm = tiny_model("llama", tokenizer)
    with pytest.raises(BadInput, match=r"model\.layers\.0: .*self_attn\.q_proj: .*inf or NaN"):
        with torch.no_grad():
            lm.model.model.layers[0].input_layernorm.weight[5] = float("inf")
        run_sequential(lm, lm.arch, token_batches(1), awq, AWQ(bits=4, group_size=32))
    # an ArchSpec whose mlp_norm is not the op feeding the MLP (as in post-norm families): the engine's check
    # after prepare_block catches the changed block instead of leaving a silently different model
    lm = with_outliers(tiny_model("llama", tokenizer))
    wrong = dataclasses.replace(lm.arch, mlp_norm="input_layernorm")
    for algorithm, step in ((smoothquant, SmoothQuant(alpha=0.5)), (awq, AWQ(bits=4, group_size=32))):
        with pytest.raises(BadInput, match=r"model\.layers\.0: .*changed the block's output"):
            run_sequential(lm, wrong, token_batches(1), algorithm, step)


def test_converted_members_leave_their_group_alone(tokenizer):
    """A group with a member an earlier step quantized cannot be rescaled: it is skipped (the norm stays),
    the other groups are still smoothed, and the model still computes the same."""
    lm = with_outliers(tiny_model("llama", tokenizer))
    compress(lm, [RTN(bits=8, group_size=None, targets=r"k_proj")])
    ids = token_batches(1, (2, 48), seed=5)[0]
    before = logits(lm, ids)
    block = lm.arch.block_list(lm.model)[0]
    norm_a, norm_m = block.input_layernorm.weight.clone(), block.post_attention_layernorm.weight.clone()
    assert [g.prev_path for g in smoothquant.smoothing_groups(block, lm.arch)] == [
        "post_attention_layernorm", "mlp.up_proj"]
    run_sequential(lm, lm.arch, token_batches(2), smoothquant, SmoothQuant(alpha=0.5))
    assert torch.equal(block.input_layernorm.weight, norm_a)
    assert not torch.equal(block.post_attention_layernorm.weight, norm_m)
    assert rel(logits(lm, ids), before) < 1e-5


def test_awq_search_error_is_the_same_in_row_slices():
    """The scale search sums its error over slices of output rows (bounded temporaries): 7 rows per slice
    (a partial last one) gives the errors of one whole-matrix product, and the same scale."""
    x = correlated_inputs(256, 64, seed=5)
    torch.manual_seed(2)
    w = torch.randn(45, 64)
    stats = awq.update_stats(awq.init_stats(torch.nn.Linear(64, 45)), x)
    H, mean = awq.gram(stats), (stats["absum"] / stats["n"]).float()
    s_whole, a_whole, e_whole = awq.search_scale([w], H, mean, 4, 32, 8, slice_=10**9)
    s_rows, a_rows, e_rows = awq.search_scale([w], H, mean, 4, 32, 8, slice_=7 * 64)
    assert e_rows == pytest.approx(e_whole, rel=1e-5) and a_rows == a_whole and torch.equal(s_rows, s_whole)
    for k, e in enumerate(e_whole):
        s = awq.scale_for(mean, k / 8)
        assert e == pytest.approx(awq.output_error(w - awq.fake_rtn(w * s, 4, 32) / s, H), rel=1e-5)


def test_awq_duo_scaling_candidates():
    """duo_scaling: RTN (s = 1) is the first candidate, so the best error is never above RTN's; the weight
    side is each input channel's mean over rows of |w| / max|w| of its group (a loop as reference, with a
    partial last group)."""
    x = correlated_inputs(512, 72, seed=4)
    torch.manual_seed(3)
    w1, w2 = torch.randn(16, 72), torch.randn(8, 72) * 3
    stats = awq.update_stats(awq.init_stats(torch.nn.Linear(72, 16)), x)
    H, mean = awq.gram(stats), (stats["absum"] / stats["n"]).float()
    ref = torch.zeros(72)
    w = torch.cat([w1, w2]).abs()
    for r in range(24):
        for g0 in range(0, 72, 32):
            blk = w[r, g0:g0 + 32]
            ref[g0:g0 + 32] += blk / (blk.max() + 1e-6) / 24
    assert torch.allclose(awq.weight_magnitude([w1, w2], 32), ref, atol=1e-6)
    s, alpha, errs = awq.search_scale([w1, w2], H, mean, 4, 32, 10, duo=True)
    rtn = sum(awq.output_error(v - awq.fake_rtn(v, 4, 32), H) for v in (w1, w2))
    assert len(errs) == 11 and errs[0] == pytest.approx(rtn, rel=1e-6) and min(errs) <= errs[0]
    s5 = awq.scale_for(mean, 0.5, ref)
    assert errs[6] == pytest.approx(sum(awq.output_error(v - awq.fake_rtn(v * s5, 4, 32) / s5, H) for v in (w1, w2)),
                                    rel=1e-5)
    assert min(errs) < 0.8 * errs[0], errs  # outlier channels: some duo scale beats RTN clearly here
