"""Structured pruning (prune/structured.py): exact removal of heads, MLP channels and blocks."""

import copy

import pytest
import torch

import lmpress
from lmpress.errors import BadInput
from lmpress.prune import structured as S

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def zero_removed(model, report):
    """The reference: the original model with the removed units' outputs zeroed (o / down input columns)."""
    spec = S.arch_for(model.config.model_type)
    cfg = model.config
    H = getattr(cfg, spec.heads_key)
    r = H // (getattr(cfg, spec.kv_heads_key, None) or H) if spec.kv_heads_key else 1
    for block, units in zip(spec.block_list(model), report["removed_units"]):
        units = torch.tensor(units, dtype=torch.long)
        if report["unit"] == "mlp":
            mod, cols = spec.get(block, spec.down), units
        else:
            mod = spec.get(block, spec.o)
            heads = S.channel_index(units, r) if report["head_unit"] == "group" else units
            cols = S.channel_index(heads, mod.in_features // H)
        with torch.no_grad():
            S._w(mod)[:, cols] = 0


@pytest.mark.parametrize("family,unit,importance,head_unit", [
    ("llama", "mlp", "magnitude", "query"), ("llama", "mlp", "activation", "query"), ("qwen2", "mlp", "taylor", "query"),
    ("gpt2", "mlp", "activation", "query"), ("opt", "mlp", "magnitude", "query"),
    ("llama", "heads", "magnitude", "query"), ("qwen2", "heads", "activation", "query"),
    ("llama", "heads", "taylor", "group"), ("qwen2", "heads", "magnitude", "group")])
def test_removal_equals_zeroing(tokenizer, ids, family, unit, importance, head_unit):
    lm = tiny_model(family, tokenizer)
    ref = copy.deepcopy(lm.model)
    rep = S.prune_structured(lm.model, unit, 0.5, importance, data=[ids], head_unit=head_unit)
    zero_removed(ref, rep)
    torch.testing.assert_close(logits(lm.model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert rep["params_after"] < rep["params_before"]


def test_per_layer_ratios_zero_the_extra_units(tokenizer, ids):
    lm = tiny_model("llama", tokenizer)
    ref = copy.deepcopy(lm.model)
    rep = S.prune_structured(lm.model, "mlp", [0.25, 0.5], "activation", data=[ids])
    assert rep["removed"] == [32, 64] and rep["stored_removed"] == 32
    assert lm.config.intermediate_size == 96  # uniform stored width: the least-pruned layer's
    zero_removed(ref, rep)
    torch.testing.assert_close(logits(lm.model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    down1 = lm.model.model.layers[1].mlp.down_proj.weight
    assert int((down1.abs().sum(0) == 0).sum()) == 32


def test_shapes_config_and_param_count(tokenizer, ids):
    lm = tiny_model("llama", tokenizer)  # D 64, I 128, 4 heads of 16, 2 KV heads, 2 layers
    before = S.n_params(lm.model)
    rep = S.prune_structured(lm.model, "mlp", 0.25, "magnitude")
    assert lm.config.intermediate_size == 96
    assert rep["params_after"] == S.n_params(lm.model) == before - 2 * 32 * 3 * 64
    mlp = lm.model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (64, 96)

    lm = tiny_model("llama", tokenizer)
    S.prune_structured(lm.model, "heads", 0.5, "magnitude", head_unit="query")  # 1 of 2 queries per KV group
    c = lm.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, 16)
    att = lm.model.model.layers[0].self_attn
    assert att.q_proj.weight.shape == (32, 64) and att.k_proj.weight.shape == (32, 64)
    assert att.o_proj.weight.shape == (64, 32) and att.num_key_value_groups == 1
    assert S.n_params(lm.model) == before - 2 * 2 * 16 * 128

    lm = tiny_model("llama", tokenizer)
    S.prune_structured(lm.model, "heads", 0.5, "magnitude", head_unit="group")  # a whole KV group: GQA intact
    c = lm.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    att = lm.model.model.layers[1].self_attn
    assert att.k_proj.weight.shape == (16, 64) and att.num_key_value_groups == 2
    assert S.n_params(lm.model) == before - 2 * (2 * 16 * 128 + 2 * 16 * 64)
    assert logits(lm.model, ids).shape == (2, 24, 512)


def test_ratio_zero_is_identity(tokenizer, ids):
    for unit, imp in (("mlp", "taylor"), ("heads", "activation"), ("depth", "influence")):
        lm = tiny_model("qwen2", tokenizer)
        ref = logits(lm.model, ids)
        S.prune_structured(lm.model, unit, 0.0, imp, data=[ids])
        assert torch.equal(logits(lm.model, ids), ref)


def test_influence_finds_the_redundant_block(tokenizer, ids):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    model = AutoModelForCausalLM.from_config(cfg).eval()
    blk = model.model.layers[2]
    with torch.no_grad():  # block 2 adds nothing to the residual stream: an identity
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    ref = logits(model, ids)
    rep = S.prune_structured(model, "depth", 0.25, "influence", data=[ids])
    assert rep["removed"] == [2] and rep["scores"][2] < 1e-12
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_target_params(tokenizer):
    lm = tiny_model("llama", tokenizer)
    before = S.n_params(lm.model)
    target = before - 40 * 2 * 3 * 64  # exactly 40 channels per layer
    rep = S.prune_structured(lm.model, "mlp", importance="magnitude", target_params=target)
    assert rep["params_after"] <= target < rep["params_after"] + 2 * 3 * 64
    with pytest.raises(BadInput, match="out of reach"):
        S.prune_structured(tiny_model("llama", lm.tokenizer).model, "mlp", target_params=1000)


def test_saved_folder_loads_in_plain_transformers(tokenizer, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_model("qwen2", tokenizer)
    S.prune_structured(lm.model, "heads", 0.5, "magnitude", head_unit="group")
    S.prune_structured(lm.model, "mlp", 0.25, "magnitude")
    S.prune_structured(lm.model, "depth", 0.5, "influence", data=[ids])
    ref = logits(lm.model, ids)
    out = lmpress.save(lm, tmp_path / "small")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_hidden_layers == 1 and plain.config.intermediate_size == 96
    assert torch.equal(logits(plain, ids), ref)
    assert torch.equal(logits(lmpress.load(out).model, ids), ref)


def test_bad_input(tokenizer):
    model = tiny_model("llama", tokenizer).model
    for ratio in (1.0, -0.1, 1.5, "half", True):
        with pytest.raises(BadInput, match="ratio"):
            S.prune_structured(model, "mlp", ratio)
    with pytest.raises(BadInput, match="removes every"):
        S.prune_structured(model, "heads", 0.9999999, head_unit="group")
    with pytest.raises(BadInput, match="unknown importance"):
        S.prune_structured(model, "mlp", 0.5, "random")
    with pytest.raises(BadInput, match="depth"):
        S.prune_structured(model, "mlp", 0.5, "influence")
    with pytest.raises(BadInput, match="calibration data"):
        S.prune_structured(model, "depth", 0.5, "influence")
    with pytest.raises(BadInput, match="head_dim"):
        S.prune_structured(tiny_model("gpt2", tokenizer).model, "heads", 0.5)
    assert model.config.intermediate_size == 128 and len(model.model.layers) == 2  # nothing changed


def test_sparse_storage_roundtrip_and_smaller_file(tokenizer, ids, tmp_path):
    from lmpress import recipe as R
    from lmpress.nn.sparse import SparseLinear, pack_mask, unpack_mask

    keep = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(keep), 13), keep)

    dense = tiny_model("llama", tokenizer)
    out_dense = lmpress.save(dense, tmp_path / "dense")
    lm = tiny_model("llama", tokenizer)
    lmpress.compress(lm, [R.MagnitudeScope(0.5, scope="global"), R.SparseStorage()], round_floats=False)
    assert sum(isinstance(m, SparseLinear) for m in lm.model.modules()) == 14  # 7 per block, not lm_head
    ref = logits(lm.model, ids)
    out = lmpress.save(lm, tmp_path / "sparse")
    back = lmpress.load(out)
    assert back.manifest["layers"]["model.layers.0.mlp.up_proj"]["format"] == "sparse-bitmask"
    assert torch.equal(logits(back.model, ids), ref)

    def size(folder):
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    blocks = sum(p.numel() for n, p in dense.model.named_parameters() if ".layers." in n and p.dim() == 2)
    saved = (blocks * 4) - (blocks // 2 * 4 + blocks // 8)  # half the values gone, one bit per weight added
    assert size(out_dense) - size(out) == pytest.approx(saved, rel=0.02)


def test_structured_recipe_step_and_recovery(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmpress import recipe as R

    lm = lmpress.load(stories.source)
    steps = [R.StructuredPrune(unit="mlp", ratio=0.5, importance="activation", n_samples=4, seq_len=32),
             R.Distill(steps=3, batch_size=2, seq_len=32, n_samples=4, eval_samples=2, device="cpu")]
    lmpress.compress(lm, steps)
    assert lm.config.intermediate_size == stories.config.intermediate_size // 2
    assert lm.info["distill"][0]["steps"] == 3
    out = lmpress.save(lm, tmp_path / "m")
    x = torch.tensor([[1, 403, 407, 261, 378]])
    # compress() stores float weights as exact fp16 values (saved as fp16): ask transformers for float32
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(logits(plain, x), logits(lm.model, x))
