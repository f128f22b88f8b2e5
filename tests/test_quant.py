"""Weight-only quantization (RTN, HQQ), packed storage, recipes and compress()."""

import copy
import json

import pytest
import torch

import lmpress
from lmpress.compress import compress, linear_layers
from lmpress.errors import BadInput
from lmpress.nn.packed import PackedLinear
from lmpress.quant.hqq import hqq_qparams
from lmpress.quant.primitives import compute_qparams, dequantize, quantize, sqnr_db
from lmpress.quant.rtn import storage_qparams
from lmpress.recipe import GPTQ, HQQ, PRESETS, RTN, W8A8Dynamic, from_dict, load_recipe, scheme, to_dict

from conftest import tiny_model

IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 300, 301, 302, 303, 304, 305]])


def logits(lm):
    with torch.inference_mode():
        return lm.model(IDS).logits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 48])
def test_packed_linear_matches_reference_fake_quant(bits, group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 20)
    m = compress(torch.nn.Sequential(lin), [RTN(bits, group)])[0]
    assert isinstance(m, PackedLinear)
    qp = storage_qparams(compute_qparams(lin.weight, bits, group, symmetric=False))
    ref_w = dequantize(quantize(lin.weight, qp), qp)
    assert torch.equal(m.dequantize(), ref_w)  # bit-exact: codes and fp16 params round-trip through packing
    x = torch.randn(3, 96)
    assert torch.allclose(m(x), m.forward_reference(x), atol=1e-5)  # kernel or not: the same arithmetic
    m.native_act = "f32"  # float activations (the default rounds small inputs to int8 per 32): the fake-quant linear
    assert torch.allclose(m(x), torch.nn.functional.linear(x, ref_w, lin.bias), atol=1e-5)


def test_partial_last_group_is_padded():
    """SmolLM2's 576 columns in groups of 128: 4.5 groups; the last is padded, not refused."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 8, bias=False)
    m = compress(torch.nn.Sequential(lin), [RTN(4, 128)])[0]
    assert m.scales.shape == (5, 8) and m.qweight.shape == (8, 288)
    w_pad = torch.nn.functional.pad(lin.weight.detach(), (0, 64))
    qp = storage_qparams(compute_qparams(w_pad, 4, 128, symmetric=False))
    assert torch.equal(m.dequantize(), dequantize(quantize(w_pad, qp), qp)[:, :576])
    assert sqnr_db(lin.weight, m.dequantize()) > 18


def test_bits_per_weight_within_3_percent_of_nominal():
    lin = torch.nn.Linear(1024, 256, bias=False)
    for bits, group in [(8, None), (4, 128), (4, 64), (3, 64), (2, 32), (4, None)]:
        m = compress(torch.nn.Sequential(torch.nn.Linear(1024, 256, bias=False)), [RTN(bits, group)])[0]
        nominal = bits + (32 / group if group else 32 / 1024)
        assert m.stored_bits_per_weight() == pytest.approx(nominal, rel=0.03), (bits, group)
    del lin


def test_hqq_error_not_above_rtn_on_real_weights(stories):
    """HQQ's objective Σ|error|^0.7 is never above min-max RTN's (per group, hence per layer), and on real
    weights it is clearly below; the mean absolute error drops too."""
    lower = 0
    for name, mod in list(linear_layers(stories.model).items())[:8]:
        w = mod.weight.detach()
        g = 32 if w.shape[1] % 32 == 0 else None
        for bits in (2, 3, 4):
            rtn = storage_qparams(compute_qparams(w, bits, g, symmetric=False))
            e_rtn = dequantize(quantize(w, rtn), rtn) - w
            codes, hq = hqq_qparams(w, bits, g)
            e_hqq = dequantize(codes, hq) - w
            assert e_hqq.abs().pow(0.7).sum() <= e_rtn.abs().pow(0.7).sum() * (1 + 1e-6), (name, bits)
            assert e_hqq.abs().mean() < e_rtn.abs().mean(), (name, bits)
            lower += e_hqq.abs().pow(0.7).sum() < 0.97 * e_rtn.abs().pow(0.7).sum()
    assert lower >= 12  # of 24


@pytest.mark.parametrize("recipe", ["w8", "w4g128", "w4", "w3g64", "w2g32", "w8a8-dynamic", "w8a8-static"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_identical_logits_every_format(tokenizer, tmp_path, recipe, family):
    lm = tiny_model(family, tokenizer)
    compress(lm, recipe)
    out = lmpress.save(lm, tmp_path / "q")
    back = lmpress.load(out)
    assert torch.equal(logits(lm), logits(back))
    manifest = json.loads((out / "lmpress.json").read_text())
    assert manifest["recipe"] == [to_dict(s) for s in PRESETS[recipe]]
    formats = {v["format"] for v in manifest["layers"].values()}
    assert formats - {"dense"}, formats


def test_quantized_file_is_smaller(tokenizer, tmp_path):
    from transformers import LlamaConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lm = lmpress.wrap(AutoModelForCausalLM.from_config(cfg), tokenizer)
    dense = lmpress.save(lm, tmp_path / "dense")
    compress(lm, "w4g64")
    q = lmpress.save(lm, tmp_path / "q4")
    lin_params = sum(m.in_features * m.out_features for m in lm.model.modules() if isinstance(m, PackedLinear))
    float_params = sum(p.numel() for p in lm.model.parameters())  # embeddings, norms (tied head counted once)
    q_bytes = sum(f.stat().st_size for f in q.glob("*.safetensors"))
    # 4 bits per weight + an fp16 scale and zero per 64 weights; float leftovers stored as fp16
    assert q_bytes == pytest.approx(lin_params * (4 + 32 / 64) / 8 + float_params * 2, rel=0.02)
    assert q_bytes < sum(f.stat().st_size for f in dense.glob("*.safetensors")) / 4
    back = lmpress.load(q)
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(back.model(ids).logits, lm.model(ids).logits)  # fp16-stored floats widen back exactly
    assert back.model.model.embed_tokens.weight.dtype == torch.float32


def test_mixed_widths_and_overrides(tokenizer):
    lm = tiny_model("llama", tokenizer)
    compress(lm, [RTN(8, None, targets=r"self_attn"), RTN(4, 32)])
    mods = dict(lm.model.named_modules())
    assert mods["model.layers.0.self_attn.q_proj"].bits == 8
    assert mods["model.layers.0.mlp.up_proj"].bits == 4
    assert isinstance(mods["lm_head"], torch.nn.Linear)  # left in float by default
    assert isinstance(mods["model.embed_tokens"], torch.nn.Embedding)
    lm2 = tiny_model("llama", tokenizer)
    compress(lm2, [RTN(8, None, ignore=None)])
    assert isinstance(dict(lm2.model.named_modules())["lm_head"], PackedLinear)  # selectable


def test_recipe_files_and_errors(tmp_path, tokenizer):
    p = tmp_path / "r.yaml"
    p.write_text("steps:\n  - step: RTN\n    bits: 3\n    group_size: 64\n  - step: hqq\n    bits: 4\n")
    assert load_recipe(str(p)) == [RTN(3, 64), HQQ(4)]
    assert from_dict(to_dict(HQQ(2, 32))) == HQQ(2, 32)
    assert scheme("w4g128", "hqq") == [HQQ(4, 128)] and scheme("w8") == [RTN(8, None, symmetric=True)]
    p.write_text("- step: RTN\n  bits: 4\n  gruop_size: 64\n")
    with pytest.raises(BadInput, match="unknown key.*gruop_size"):
        load_recipe(str(p))
    with pytest.raises(BadInput, match="unknown recipe step"):
        load_recipe([{"step": "Magic"}])
    for bad in (1, 9, 2.5):
        with pytest.raises(BadInput, match="bits"):
            RTN(bits=bad)
    with pytest.raises(BadInput, match="group_size"):
        RTN(4, 0)
    with pytest.raises(BadInput, match="unknown scheme"):
        scheme("w4x")
    with pytest.raises(BadInput, match="match no"):
        compress(tiny_model("llama", tokenizer), [RTN(4, 32, targets="no_such_layer")])
    with pytest.raises(BadInput, match="unknown recipe"):
        load_recipe("w5g7-nonsense")
    assert W8A8Dynamic().ignore == RTN().ignore


def test_benchmark_recipe_files_load():
    """The recipe files that benchmarks/*.md quote load, each to at least one step of a known kind (a renamed
    field would otherwise surface only when someone reruns a figure)."""
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "benchmarks" / "recipes").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        steps = load_recipe(str(f))
        assert steps and all(hasattr(s, "ignore") for s in steps), f.name


def test_qat_through_compress_recipe(stories, tmp_path):
    """The QAT step from a YAML recipe through lmpress.compress: trains, converts to packed codes, saves."""
    p = tmp_path / "qat.yaml"
    p.write_text("- step: QAT\n  bits: 4\n  group_size: 32\n  steps: 2\n  lr: 1e-3\n  batch_size: 2\n"
                 "  seq_len: 16\n  n_samples: 4\n")
    lm = lmpress.load(stories.source)
    compress(lm, str(p))
    assert list(linear_layers(lm.model)) == ["lm_head"]  # every other linear layer was converted
    assert sum(isinstance(m, PackedLinear) for m in lm.model.modules()) == 5 * 7
    back = lmpress.load(lmpress.save(lm, tmp_path / "q"))
    assert torch.equal(logits(lm), logits(back)) and back.recipe[0]["step"] == "QAT"


def test_gptq_preset_through_compress_saves_and_loads(tokenizer, tmp_path):
    lm = tiny_model("llama", tokenizer)
    data = [torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))]
    compress(lm, "gptq-w4g128", data=data)
    assert sum(isinstance(m, PackedLinear) for m in lm.model.modules()) == 2 * 7
    back = lmpress.load(lmpress.save(lm, tmp_path / "g"))
    assert torch.equal(logits(lm), logits(back)) and back.recipe[0]["step"] == "GPTQ"
    with pytest.raises(BadInput, match="ignore"):
        compress(tiny_model("llama", tokenizer), [GPTQ(4, 32, ignore=None)], data=data)  # lm_head: outside blocks


def test_hqq_minmax_start_never_above_its_start_and_bad_start_refused():
    """start="minmax": the fractional zero that puts each group's min and max on the first and last code; the
    solver keeps, per group, nothing worse (by its objective) than that start."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g) * torch.linspace(0.2, 3.0, 128)  # uneven columns
    for bits in (3, 4):
        qp = storage_qparams(compute_qparams(w, bits, 32, symmetric=False))
        wg = w.reshape(16, 4, 32)
        s = qp.scale[..., None]
        z0 = (-wg.amin(-1, keepdim=True) / s).half().float()
        c0 = torch.clamp(torch.round(wg / s + z0), 0, 2**bits - 1)
        start_obj = ((c0 - z0) * s - wg).abs().pow(0.7).sum(-1)
        codes, hq = hqq_qparams(w, bits, 32, start="minmax")
        e = (dequantize(codes, hq) - w).reshape(16, 4, 32).abs().pow(0.7).sum(-1)
        assert bool((e <= start_obj * (1 + 1e-6)).all()), bits
        c_start, q_start = hqq_qparams(w, bits, 32, iters=0, start="minmax")  # no iterations: the start itself
        assert torch.equal(c_start.float().reshape(16, 4, 32), c0) and torch.equal(q_start.zero, z0[..., 0]), bits
    with pytest.raises(BadInput):
        HQQ(bits=3, group_size=64, start="middle")
    with pytest.raises(ValueError):
        hqq_qparams(w, 3, 32, start="middle")


def test_hqq_auto_start_keeps_the_start_with_the_lower_check_kld(stories):
    """start="auto" quantizes with both starts and keeps the model closer (KLD on a check text) to the float one:
    the result is exactly what the chosen explicit start gives, and both KLDs are recorded."""
    from lmpress.quant.hqq import check_kld

    auto = copy.deepcopy(stories)
    compress(auto, [HQQ(bits=3, group_size=32)])
    rec = auto.info["hqq_start"][-1]
    assert set(rec["check_kld"]) == {"rtn", "minmax"} and rec["check_kld"]["rtn"] != rec["check_kld"]["minmax"]
    assert rec["chosen"] == min(rec["check_kld"], key=rec["check_kld"].get)
    fixed = copy.deepcopy(stories)
    compress(fixed, [HQQ(bits=3, group_size=32, start=rec["chosen"])])
    ids = torch.tensor([[1, 5, 77, 300, 12, 9, 41]])
    with torch.inference_mode():
        assert torch.equal(auto.model(ids).logits, fixed.model(ids).logits)
    # the check itself: a candidate identical to the float layers has KLD 0, and the model is left unchanged
    model = copy.deepcopy(stories.model)
    layers = linear_layers(model)
    same = {id(m): copy.deepcopy(m) for m in layers.values()}
    assert check_kld(model, [ids], {"same": same}) == {"same": 0.0}
    assert all(linear_layers(model)[n] is m for n, m in layers.items())


def test_hqq_auto_start_without_text_is_the_integer_start():
    """A bare module has no tokenizer and no check text: "auto" is then the integer (rtn) start."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    b = copy.deepcopy(a)
    compress(a, [HQQ(bits=3, group_size=32)])
    compress(b, [HQQ(bits=3, group_size=32, start="rtn")])
    x = torch.randn(4, 64)
    assert torch.equal(a(x), b(x))
