"""The fused decode step (kernels.decode_plan / decode_step, csrc/decode.cpp): NativeRunner.decode of one row in one
native call computes the per-op path's logits and greedy tokens, for every layer format it takes, and leaves the
per-op path to every model it does not take."""

from __future__ import annotations

import time

import pytest
import torch

import lmpress
from conftest import tiny_model
from lmpress import kernels
from lmpress.compress import compress
from lmpress.errors import BadInput
from lmpress.nn.int8_static import Int8StaticLinear
from lmpress.recipe import RTN, W8A8Dynamic
from lmpress.runtime import Engine, NativeRunner, SamplingParams

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.available(), reason="native kernels not built")]

HEAD8 = RTN(8, None, symmetric=True, targets="lm_head", ignore=None)
HEAD4 = RTN(4, 32, targets="lm_head", ignore=None)
RECIPES = {"fp32": [], "w4g32": [RTN(4, 32)], "w4g128": [RTN(4, 128)], "w8": [RTN(8, None, symmetric=True)],
           "w4g32+h8": [RTN(4, 32), HEAD8], "w8+h4": [RTN(8, None, symmetric=True), HEAD4],
           "w8a8": [W8A8Dynamic()], "attn8+mlp4": [RTN(8, None, targets=r"self_attn"), RTN(4, 32)],
           "w3g64": [RTN(3, 64)], "w2g32+h8": [RTN(2, 32), HEAD8], "attn3+mlp4": [RTN(3, 32, targets=r"self_attn"),
                                                                                RTN(4, 32)]}
# Float arithmetic differs from the per-op path only in summation order (1e-7 of the logits here); int8-rounded
# ("q8") activations can then land on the other side of a rounding tie, one code apart: measured at most 1.3e-3
# of the largest logit on these models
TOL = {"exact": 1e-5, "q8": 4e-3}


def make(family, tokenizer, recipe):
    lm = tiny_model(family, tokenizer)
    if RECIPES[recipe]:
        compress(lm, RECIPES[recipe])
    return lm


def runners(lm, max_len):
    fused, ref = NativeRunner(lm, max_len=max_len), NativeRunner(lm, max_len=max_len)
    ref.fused = False
    return fused, ref


def max_rel_diff(lm, positions=range(5, 48), pos_as_list=False, max_len=64):
    """Largest |fused − per-op| over the logits of many decode steps (teacher-forced), ÷ the largest |logit|."""
    fused, ref = runners(lm, max_len)
    ids = torch.randint(3, lm.config.vocab_size, (1, max(positions) + 1), generator=torch.Generator().manual_seed(0))
    fused.prefill(ids[:, :positions[0]])
    ref.prefill(ids[:, :positions[0]])
    worst = 0.0
    for t in positions:
        a = fused.decode(ids[:, t], [t] if pos_as_list else t)
        b = ref.decode(ids[:, t], t)
        assert a.shape == b.shape == (1, lm.config.vocab_size)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    assert fused._plan and fused.fused_reason is None, fused.fused_reason
    return worst


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fused_logits_match_the_per_op_path(family, recipe, tokenizer):
    lm = make(family, tokenizer, recipe)
    tol = TOL["exact"] if recipe in ("fp32", "w8a8", "w3g64") else TOL["q8"]
    assert max_rel_diff(lm, pos_as_list=recipe == "w8") <= tol


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", ["fp32", "w4g32+h8", "w4g128", "w8"])
def test_fused_greedy_tokens_equal_the_per_op_path(family, recipe, tokenizer):
    lm = make(family, tokenizer, recipe)
    prompt = torch.randint(3, 512, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    fused, ref = Engine(lm, max_len=64), Engine(lm, max_len=64)
    ref.runner.fused = False
    assert fused.generate(prompt, params).token_ids == ref.generate(prompt, params).token_ids
    assert fused.runner._plan


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_w8a8_and_f32_activations(family, tokenizer, monkeypatch):
    """Int8StaticLinear layers (their calibrated grid) beside float ones; PackedLinear with float activations."""
    lm = tiny_model(family, tokenizer)
    block = lm.model.model.layers[0]
    block.mlp.down_proj = Int8StaticLinear.from_linear(block.mlp.down_proj, 0.002, 64)
    block.self_attn.q_proj = Int8StaticLinear.from_linear(block.self_attn.q_proj, 0.03, 60)
    assert max_rel_diff(lm, range(5, 20)) <= TOL["exact"]
    lm = make(family, tokenizer, "w4g32+h8")
    from lmpress.nn.packed import PackedLinear
    monkeypatch.setattr(PackedLinear, "native_act", "f32")
    assert max_rel_diff(lm, range(5, 20)) <= TOL["exact"]


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_instruction_paths_and_threads(isa, tokenizer, monkeypatch):
    if isa != "scalar" and kernels.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    lm = make("llama", tokenizer, "w4g32+h8")
    monkeypatch.setattr(kernels, "ISA_CAP", isa)
    assert max_rel_diff(lm, range(5, 20)) <= TOL["q8"]
    kernels.set_num_threads(2)
    try:
        assert max_rel_diff(lm, range(5, 20)) <= TOL["q8"]
        # heads of 64 over 100 positions: attention splits its heads across the threads too
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
        wide = lmpress.wrap(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tokenizer, name="wide")
        assert max_rel_diff(wide, range(60, 100), max_len=128) <= TOL["exact"]
    finally:
        kernels.set_num_threads(None)


def test_unsupported_layers_and_switches_keep_the_per_op_path(tokenizer, monkeypatch):
    lm = make("llama", tokenizer, "fp32")
    compress(lm, [RTN(5, 32, targets=r"mlp\.down_proj")])  # 5-bit: no GEMV kernel
    fused, ref = runners(lm, 64)
    ids = torch.tensor([[1, 47, 300, 12, 99, 5]])
    fused.prefill(ids[:, :5])
    ref.prefill(ids[:, :5])
    assert torch.equal(fused.decode(ids[:, 5], 5), ref.decode(ids[:, 5], 5))
    assert fused._plan is False and "PackedLinear" in fused.fused_reason and "bits=5" in fused.fused_reason

    lm = make("qwen2", tokenizer, "w4g32")
    r = NativeRunner(lm, max_len=16)
    r.prefill(ids[:, :5])
    monkeypatch.setattr(kernels, "ENABLED", False)  # LMPRESS_KERNELS=0: no fused step either
    r.decode(ids[:, 5], 5)
    assert r._plan is None
    monkeypatch.setattr(kernels, "ENABLED", True)
    r.fused = False
    r.decode(ids[:, 5], 5)
    assert r._plan is None
    r.fused = True
    r.decode(ids[:, 5], 5)
    assert r._plan
    with pytest.raises(BadInput, match="context limit"):
        r.decode(torch.tensor([5]), 16)


def test_profile_times_every_phase_and_changes_no_logits(tokenizer):
    """kernels.decode_profile: off, the steps are timed nowhere; on, every phase of a step gets time, the total
    stays within the wall clock, each call resets, and the logits are the unprofiled step's to the bit."""
    lm = make("llama", tokenizer, "w4g32+h8")
    ids = torch.randint(3, lm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    outs = []
    for on in (False, True):
        run = NativeRunner(lm, max_len=32)
        assert run._build_plan()
        plan = run._plan[0]
        assert set(kernels.decode_profile(plan, on).values()) == {0.0}
        run.prefill(ids[:, :8])
        t0 = time.perf_counter()
        outs.append(torch.cat([run.decode(ids[:, t], t) for t in range(8, 20)]))
        wall = time.perf_counter() - t0
        prof = kernels.decode_profile(plan, False)
        assert tuple(prof) == kernels.DECODE_PHASES
        if on:
            assert all(v > 0 for v in prof.values()), prof
            assert sum(prof.values()) <= wall
        else:
            assert set(prof.values()) == {0.0}
        assert set(kernels.decode_profile(plan, False).values()) == {0.0}  # reset by the call before
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("head_dim", [8, 40, 64])
def test_attention_head_widths(isa, head_dim, tokenizer, monkeypatch):
    """The fused attention's vector paths (32 columns per pass, then 8; scores 4 positions at a time with a
    remainder) and the scalar one equal the per-op path at head widths 8, 40 (32 + 8) and 64, GQA 2:1, for
    lengths that are and are not multiples of 4."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if isa == "avx2" and kernels.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(kernels, "ISA_CAP", isa)
    cfg = LlamaConfig(hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, vocab_size=512, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    lm = lmpress.wrap(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tokenizer, name="attn")
    assert max_rel_diff(lm, positions=range(3, 40)) <= TOL["exact"]


def test_decode_writes_into_the_logits_it_is_given(tokenizer):
    """runner.decode(out=the last logits): the fused step writes there (no fresh 4·V bytes per token) and the
    logits are those of a fresh tensor; an unusable `out` (other shape or dtype) is left alone."""
    lm = make("llama", tokenizer, "w4g32+h8")
    a, b = NativeRunner(lm, max_len=32), NativeRunner(lm, max_len=32)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    a.prefill(ids[:, :4])
    b.prefill(ids[:, :4])
    buf = None
    for t in range(4, 16):
        ref = a.decode(ids[:, t], t)
        got = b.decode(ids[:, t], t, out=buf)
        if buf is not None:
            assert got is buf
        assert torch.equal(got, ref)
        buf = got
    wrong = torch.zeros(1, 7)
    assert b.decode(ids[:, 3], 3, out=wrong) is not wrong and torch.equal(wrong, torch.zeros(1, 7))


def test_greedy_token_is_torch_argmax():
    from lmpress.runtime.sampling import greedy_token

    g = torch.Generator().manual_seed(0)
    for x in [torch.randn(49152, generator=g), torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([[0.0, 5.0, 5.0]]),
              torch.tensor([1.0, float("nan"), 9.0, float("nan")]), torch.full((10,), float("-inf")),
              torch.randn(6, generator=g, dtype=torch.float64), torch.randn(5, generator=g)[::2]]:
        assert greedy_token(x) == int(x.reshape(-1).argmax()), x
