"""Calibration data specs and resumable calibrated compression (calibrate.BlockCheckpoints, compress(checkpoint=))."""

import json

import pytest
import torch
from safetensors import safe_open

import lmpress
from lmpress import calibrate
from lmpress.cli import main
from lmpress.compress import calibration, compress, parse_calib
from lmpress.errors import BadInput
from lmpress.models.io import save
from lmpress.recipe import GPTQ, RTN, Magnitude, SmoothQuant, SparseGPT, W8A8Dynamic, Wanda

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

RECIPE = [SparseGPT(pattern="2:4"), RTN(bits=8, targets=r"lm_head$", ignore=None), GPTQ(bits=4, group_size=32)]


def state(lm) -> dict:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [(0, 1), (2, 0), (2, 1)])  # (recipe step, block) where the run dies
def test_killed_run_resumes_to_bit_identical_weights(stories_dir, tmp_path, monkeypatch, kill_at):
    """A run killed inside block b of step s, then rerun with the same checkpoint folder, gives exactly the
    weights of a run never interrupted; the rerun loads the finished blocks instead of recomputing them."""
    data = calibration(lmpress.load(stories_dir / "hf"), "builtin:8x64")
    whole = compress(lmpress.load(stories_dir / "hf"), RECIPE, data=data)

    real = calibrate._compress_block
    calls = []

    def dying(block, index, *a, **k):
        calls.append(index)
        step = sum(1 for i in range(1, len(calls)) if calls[i] == 0)  # a new step starts at block 0
        if (step, index) == (kill_at[0] // 2, kill_at[1]):  # steps 0 and 2 are the engine's 1st and 2nd
            raise Killed
        return real(block, index, *a, **k)

    monkeypatch.setattr(calibrate, "_compress_block", dying)
    with pytest.raises(Killed):
        compress(lmpress.load(stories_dir / "hf"), RECIPE, data=data, checkpoint=tmp_path / "ck")
    monkeypatch.setattr(calibrate, "_compress_block", real)
    lm = compress(lmpress.load(stories_dir / "hf"), RECIPE, data=data, checkpoint=tmp_path / "ck")
    resumed = [c["resumed_blocks"] for c in lm.info["calibration"]]
    n_blocks = len(lm.arch.block_list(lm.model))
    assert resumed == ([kill_at[1], 0] if kill_at[0] == 0 else [n_blocks, kill_at[1]])
    assert_same_state(state(lm), state(whole))


def test_checkpoint_of_another_job_is_refused(stories_dir, tmp_path):
    lm = lmpress.load(stories_dir / "hf")
    data = calibration(lm, "builtin:8x64")
    compress(lm, [GPTQ(bits=4, group_size=32)], data=data, checkpoint=tmp_path / "ck")
    with pytest.raises(BadInput, match="belongs to another job"):
        compress(lmpress.load(stories_dir / "hf"), [GPTQ(bits=3, group_size=32)], data=data,
                 checkpoint=tmp_path / "ck")
    other = calibration(lm, "builtin:8x64", seed=1)
    with pytest.raises(BadInput, match="belongs to another job"):
        compress(lmpress.load(stories_dir / "hf"), [GPTQ(bits=4, group_size=32)], data=other,
                 checkpoint=tmp_path / "ck")


def test_damaged_checkpoint_says_how_to_start_over(stories_dir, tmp_path):
    lm = lmpress.load(stories_dir / "hf")
    data = calibration(lm, "builtin:8x64")
    compress(lm, [GPTQ(bits=4, group_size=32)], data=data, checkpoint=tmp_path / "ck")
    f = sorted((tmp_path / "ck").glob("step0-block*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BadInput, match="delete .* to start over"):
        compress(lmpress.load(stories_dir / "hf"), [GPTQ(bits=4, group_size=32)], data=data,
                 checkpoint=tmp_path / "ck")


def test_calibration_specs(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    assert parse_calib("builtin") == ("builtin", 128, 512)
    assert parse_calib("notes.jsonl:body:16x64") == ("notes.jsonl:body", 16, 64)
    for bad, msg in [("wikitext2:8x64", "evaluates on"), ("builtin:0x64", "at least 1 sample")]:
        with pytest.raises(BadInput, match=msg):
            parse_calib(bad)
    lm = lmpress.load(stories_dir / "hf")
    b = calibration(lm, "builtin:10x33", batch_size=4)
    assert [tuple(x.shape) for x in b] == [(4, 33), (4, 33), (2, 33)]
    assert all((x[:, 0] == lm.bos_id).all() for x in b)  # each sample starts as the model's inputs do
    assert all(torch.equal(x, y) for x, y in zip(b, calibration(lm, "builtin:10x33", batch_size=4)))
    selfgen = calibration(lm, "self:3x20")
    assert tuple(selfgen[0].shape) == (3, 20) and (selfgen[0][:, 0] == lm.bos_id).all()
    selfgen = calibration(lm, "self:5x20", batch_size=2)  # sampled together, cut into the engine's batches
    assert [tuple(x.shape) for x in selfgen] == [(2, 20), (2, 20), (1, 20)]
    assert all(torch.equal(x, y) for x, y in zip(selfgen, calibration(lm, "self:5x20", batch_size=2)))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": "Once upon a time " * 40}) for _ in range(4)))
    assert calibration(lm, f"{tmp_path}/c.jsonl:body:4x16")[0].shape == (4, 16)
    with pytest.raises(BadInput, match="room for"):
        calibration(lm, f"{tmp_path}/c.jsonl:body:400x64")


def test_self_calibration_cache(stories_dir, tmp_path, monkeypatch):
    """--calib self is sampled once per (weights, N, L, seed): the cached draw is the fresh draw, a damaged
    entry is sampled again, and other weights or another seed get their own draw."""
    from lmpress.quant.qat import sample_batches

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    lm = lmpress.load(stories_dir / "hf")
    fresh = torch.cat(sample_batches(lm.model, 6, 24, 32, lm.bos_id, seed=0))
    first = torch.cat(calibration(lm, "self:6x24"))
    assert torch.equal(first, fresh)
    (entry,) = (tmp_path / "cache" / "calib").glob("self-*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    assert torch.equal(torch.cat(calibration(lm, "self:6x24")), fresh)  # resampled
    with safe_open(entry, "pt") as f:
        assert torch.equal(f.get_tensor("ids"), fresh)  # and the entry replaced
    assert not torch.equal(torch.cat(calibration(lm, "self:6x24", seed=1)), fresh)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(3.0)  # sharper distribution, other samples
    assert len(list((tmp_path / "cache" / "calib").glob("self-*.safetensors"))) == 2
    assert not torch.equal(torch.cat(calibration(lm, "self:6x24")), fresh)
    assert len(list((tmp_path / "cache" / "calib").glob("self-*.safetensors"))) == 3


def test_calibration_token_file(stories_dir, tmp_path, monkeypatch, capsys):
    """`lmpress calib` saves the rows compress would use; --calib FILE.safetensors[:NxL] reads them back (a
    prefix when sized), so `self` sampled once feeds a streamed run; bad files are one-line errors."""
    from safetensors.torch import save_file

    from lmpress.compress import read_token_file, write_token_file
    from lmpress.models.stream import load_streaming

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    path = stories_dir / "hf"
    lm = lmpress.load(path)
    f = tmp_path / "self.safetensors"
    assert main(["calib", str(path), "--calib", "self:6x24", "--out", str(f), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["samples"], res["tokens_per_sample"]) == (6, 24) and f.exists()
    drawn = torch.cat(calibration(lm, "self:6x24"))
    assert torch.equal(torch.cat(calibration(lm, str(f), batch_size=4)), drawn)
    assert [tuple(b.shape) for b in calibration(lm, f"{f}:3x10", batch_size=2)] == [(2, 10), (1, 10)]
    assert torch.equal(torch.cat(calibration(lm, f"{f}:3x10")), drawn[:3, :10])
    # the streamed run that refuses `self` takes the file, and calibrates exactly as the in-memory run on `self`
    data = calibration(lm, str(f))
    streamed = compress(load_streaming(path), [SparseGPT(sparsity=0.5)], data=data)
    assert_same_state(state(streamed), state(compress(lmpress.load(path), [SparseGPT(sparsity=0.5)],
                                                      data=calibration(lm, "self:6x24"))))
    import gc

    from lmpress.models import stream

    real, folders = stream.park_block, set()
    monkeypatch.setattr(stream, "park_block", lambda lm, i, folder=None: folders.add(folder) or real(lm, i, folder))
    rc = main(["compress", str(path), "--recipe", "wanda-50", "--stream", "--calib", str(f), "--out",
               str(tmp_path / "w"), "--no-eval", "--json", "--quiet"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["calibration"]["samples"] == 6
    gc.collect()  # (the streamed model's hooks make a cycle) its pruned blocks waited beside --out, then went
    assert folders == {str(tmp_path)} and not list(tmp_path.glob(".lmpress-blocks-*"))
    assert (tmp_path / "w" / "lmpress.json").exists()
    # bad input
    assert main(["calib", str(path), "--out", str(f), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    save_file({"ids": torch.zeros(2, 8)}, str(tmp_path / "float.safetensors"))
    save_file({"tokens": torch.zeros(2, 8, dtype=torch.long)}, str(tmp_path / "named.safetensors"))
    save_file({"ids": torch.full((2, 8), 10**6)}, str(tmp_path / "big.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    write_token_file(drawn, tmp_path / "other.safetensors", meta={"tokenizer_size": 7})
    for name, msg in [("missing", "no such token file"), ("float", "integer tensor 'ids'"),
                      ("named", "integer tensor 'ids'"), ("junk", "not a safetensors file"),
                      ("big", "outside this model's vocabulary"), ("other", "tokenizer of 7 tokens"),
                      ("self", "6 samples of 24 tokens; 7x24 asked")]:
        spec = f"{tmp_path / name}.safetensors" + (":7x24" if name == "self" else "")
        with pytest.raises(BadInput, match=msg):
            calibration(lm, spec)
    with pytest.raises(BadInput, match="a .safetensors file"):
        write_token_file(drawn, tmp_path / "ids.pt")
    with pytest.raises(BadInput, match="6 samples of 24 tokens; 6x30 asked"):
        read_token_file(f, lm, 6, 30)
    rc = main(["compress", str(path), "--recipe", "gptq-w4g128", "--stream", "--calib", "self:4x32", "--out",
               str(tmp_path / "s"), "--no-eval"])
    assert rc == 2 and "lmpress calib" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_cli_compress_calib_and_checkpoint_cleanup(stories_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["compress", str(stories_dir / "hf"), "--recipe", "gptq-w4g128", "--calib", "builtin:8x64",
               "--out", str(out), "--no-eval", "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["calibration"]["samples"] == 8 and res["calibration"]["tokens"] == 8 * 64
    assert res["calibration"]["steps"][0]["resumed_blocks"] == 0
    assert not (tmp_path / ".q.resume").exists()  # the checkpoints go once the model is saved
    assert (out / "lmpress.json").exists()
    rc = main(["compress", str(stories_dir / "hf"), "--recipe", "gptq-w4g128", "--calib", "wikitext2:8x64",
               "--out", str(tmp_path / "r"), "--no-eval"])
    assert rc == 2 and "evaluates on" in capsys.readouterr().err and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------- streaming, spill

@pytest.mark.parametrize("source", ["hf", "stories260K.gguf"])
def test_streamed_compression_equals_in_memory(stories_dir, tmp_path, source):
    """Blocks read from the file one at a time (their weights on `meta` until the engine reaches them), with
    activations file-backed: exactly the in-memory result, for a transformers folder and a GGUF file."""
    from lmpress.models.stream import load_streaming

    path = stories_dir / source
    data = calibration(lmpress.load(path), "builtin:8x64")
    recipe = [RTN(bits=8, targets=r"lm_head$", ignore=None), GPTQ(bits=4, group_size=32)]
    lm = load_streaming(path)
    blocks = lm.arch.block_list(lm.model)
    assert all(p.device.type == "meta" for p in blocks.parameters())
    outside = {n: p.device.type for n, p in lm.model.named_parameters() if ".layers." not in n}
    # the embedding and the head are read when needed (capture; close), the small rest at once
    assert outside == {n: "meta" if "embed_tokens" in n or n.startswith("lm_head") else "cpu" for n in outside}
    compress(lm, recipe, data=data, spill=tmp_path / "spill", device="cpu")  # (the device path, on the CPU)
    assert lm.stream is None and len(list((tmp_path / "spill").glob("hidden-*.bin"))) == len(data)
    ref = compress(lmpress.load(path), recipe, data=data)
    assert_same_state(state(lm), state(ref))


def test_streamed_tied_embedding(tokenizer, tmp_path):
    """A head tied to the embedding (Qwen2, SmolLM2): released after the capture with the embedding, tied again
    when the model closes, and the result equals the in-memory one."""
    from lmpress.models.stream import load_streaming

    src = tiny_model("qwen2", tokenizer, seed=3)
    src.model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = calibration(src, "builtin:4x32")
    lm = load_streaming(tmp_path / "m")
    assert lm.model.lm_head.weight.device.type == "meta"
    compress(lm, [GPTQ(bits=4, group_size=32)], data=data, defer_outside=True)
    assert lm.model.lm_head.weight.device.type == "meta"  # on disk until the model runs or is saved
    ref = compress(lmpress.load(tmp_path / "m"), [GPTQ(bits=4, group_size=32)], data=data)
    save(lm, tmp_path / "s")  # the embedding written from the file, rounded to fp16 as compress rounds leftovers
    save(ref, tmp_path / "r")
    assert_same_state(state(lmpress.load(tmp_path / "s")), state(lmpress.load(tmp_path / "r")))
    ids = torch.tensor([[1, 7, 9, 4]])
    logits = lm.model(ids).logits  # the first forward reads them
    assert lm.stream is None and lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert_same_state(state(lm), state(ref))
    assert torch.equal(logits, ref.model(ids).logits)


@pytest.mark.parametrize("recipe", [[SparseGPT(sparsity=0.5)], [Wanda(pattern="2:4"), GPTQ(bits=4, group_size=32)]])
def test_streamed_float_blocks_wait_on_disk(stories_dir, tmp_path, monkeypatch, recipe):
    """A block that a step leaves in float (pruned) goes to disk once finished, so the engine holds one float
    block, not the float model; a later step reads it back exactly, the save writes it from disk, a forward
    reads it back, and every result equals the in-memory one."""
    from lmpress.models.stream import load_streaming

    path = stories_dir / "hf"
    data = calibration(lmpress.load(path), "builtin:8x64")
    ref = compress(lmpress.load(path), recipe, data=data)
    lm = load_streaming(path)
    blocks = lm.arch.block_list(lm.model)
    n = len(blocks)
    real, resident = calibrate._compress_block, []

    def watching(block, index, *a, **k):
        resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        return real(block, index, *a, **k)

    monkeypatch.setattr(calibrate, "_compress_block", watching)
    compress(lm, recipe, data=data, checkpoint=tmp_path / "ck", defer_outside=True)
    assert resident[:n] == [1] * n  # pruning: only the block at work is in memory
    if len(recipe) == 1:
        assert all(p.device.type == "meta" for p in blocks.parameters())  # all pruned blocks wait on disk
        assert len(list(tmp_path.glob(".lmpress-blocks-*/block-*.safetensors"))) == n
    else:  # GPTQ reads each pruned block back and keeps its (small) quantized form
        assert resident[n:] == list(range(1, n + 1))
        assert not list(tmp_path.glob(".lmpress-blocks-*/block-*"))
    save(lm, tmp_path / "s")
    save(ref, tmp_path / "r")
    assert_same_state(state(lmpress.load(tmp_path / "s")), state(lmpress.load(tmp_path / "r")))
    ids = torch.tensor([[1, 7, 9, 4]])
    logits = lm.model(ids).logits  # the first forward reads what is on disk
    assert lm.stream is None and not list(tmp_path.glob(".lmpress-blocks-*"))
    assert_same_state(state(lm), state(ref))
    assert torch.equal(logits, ref.model(ids).logits)


@pytest.mark.parametrize("recipe", [[Magnitude(0.5), RTN(bits=4, group_size=32), RTN(bits=8, targets=r"lm_head$",
                                                                                    ignore=None)],
                                    [SmoothQuant(alpha=0.5), W8A8Dynamic()]])
def test_streamed_data_free_steps_go_block_by_block(stories_dir, tmp_path, monkeypatch, recipe):
    """A per-layer step (magnitude pruning, RTN, W8A8 dynamic) on a streamed model reads one block at a time,
    and what it leaves in float goes back to disk: never more than one float block in memory, and the result
    equals the in-memory one."""
    import sys

    from lmpress.models.stream import load_streaming
    from lmpress.nn import is_float_linear

    path = stories_dir / "hf"
    data = calibration(lmpress.load(path), "builtin:8x64")
    ref = compress(lmpress.load(path), recipe, data=data)
    lm = load_streaming(path)
    blocks = lm.arch.block_list(lm.model)
    float_blocks = []

    def watched(convert):
        def run(mod, step):
            float_blocks.append(sum(any(is_float_linear(m) and m.weight.device.type != "meta" for m in b.modules())
                                    for b in blocks))
            return convert(mod, step)
        return run

    table = sys.modules["lmpress.compress"].CONVERT  # (the package's `compress` is the function)
    for kind, convert in list(table.items()):
        monkeypatch.setitem(table, kind, watched(convert))
    compress(lm, recipe, data=data, checkpoint=tmp_path / "ck", defer_outside=True)
    assert float_blocks and max(float_blocks) == 1
    save(lm, tmp_path / "s")
    save(ref, tmp_path / "r")
    assert_same_state(state(lmpress.load(tmp_path / "s")), state(lmpress.load(tmp_path / "r")))
    ids = torch.tensor([[1, 7, 9, 4]])
    assert torch.equal(lm.model(ids).logits, ref.model(ids).logits)
    assert lm.stream is None and not list(tmp_path.glob(".lmpress-blocks-*"))


@pytest.mark.parametrize("recipe", [[GPTQ(bits=4, group_size=32)], [SparseGPT(sparsity=0.5)]])
def test_streamed_run_resumes(stories_dir, tmp_path, monkeypatch, recipe):
    from lmpress.models.stream import load_streaming

    path = stories_dir / "hf"
    data = calibration(lmpress.load(path), "builtin:8x64")
    whole = compress(lmpress.load(path), recipe, data=data)
    real = calibrate._compress_block

    seen = []

    def dying(block, index, *a, **k):
        seen.append({n: p.device.type for n, p in lm.model.named_parameters() if ".layers." not in n})
        if index == 2:
            raise Killed
        return real(block, index, *a, **k)

    monkeypatch.setattr(calibrate, "_compress_block", dying)
    lm = load_streaming(path)
    with pytest.raises(Killed):
        compress(lm, recipe, data=data, checkpoint=tmp_path / "ck")
    # while the engine works on the blocks, the embedding (read for the capture only) and the head are not in RAM
    assert len(seen) == 3 and all(d["model.embed_tokens.weight"] == d["lm_head.weight"] == "meta" for d in seen)
    monkeypatch.setattr(calibrate, "_compress_block", real)
    lm = compress(load_streaming(path), recipe, data=data, checkpoint=tmp_path / "ck")
    assert lm.info["calibration"][0]["resumed_blocks"] == 2
    assert_same_state(state(lm), state(whole))


def test_stream_bad_input(stories_dir, tmp_path, capsys):
    from lmpress.models.stream import load_streaming

    q = tmp_path / "q"
    assert main(["quantize", str(stories_dir / "hf"), "--scheme", "w4g32", "--out", str(q), "--no-eval",
                 "--quiet"]) == 0
    with pytest.raises(BadInput, match="not a model lmpress already compressed"):
        load_streaming(q)
    rc = main(["compress", str(stories_dir / "hf"), "--recipe", "gptq-w4g128", "--stream", "--calib", "self:4x32",
               "--out", str(tmp_path / "s"), "--no-eval"])
    assert rc == 2 and "drop --stream" in capsys.readouterr().err and not (tmp_path / "s").exists()
    rc = main(["compress", str(stories_dir / "hf"), "--recipe", "gptq-w4g128", "--stream", "--calib", "builtin:8x64",
               "--out", str(tmp_path / "t"), "--json", "--quiet", "--eval-windows", "1", "--data", "builtin",
               "--ctx", "64"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["eval"]["kld"] > 0 and (tmp_path / "t" / "lmpress.json").exists()
