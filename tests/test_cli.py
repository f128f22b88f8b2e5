"""The command line: JSON keys, tables, and one-line errors with non-zero exit codes."""

import json
import subprocess
import sys

import pytest

import lmpress
from lmpress.cli import main

from conftest import tiny_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def story_file(tmp_path_factory, stories_text):
    p = tmp_path_factory.mktemp("text") / "story.txt"
    p.write_text(stories_text)
    return p


def test_info_json_and_table(capsys, stories_dir):
    res = run_json(capsys, "info", stories_dir / "stories260K.gguf")
    assert res["kind"] == "gguf" and res["layers"] == 5 and res["vocab_size"] == 512
    assert res["params"] == 292_800 and res["size_bytes"] == (stories_dir / "stories260K.gguf").stat().st_size
    assert res["gguf_types"] == {"F32": 48}
    code, out, _ = run(capsys, "info", stories_dir / "hf")
    assert code == 0 and "LlamaForCausalLM" in out and "292,800" in out


def test_eval_perplexity_and_kld(capsys, stories_dir, story_file):
    res = run_json(capsys, "eval", stories_dir / "hf", "--data", story_file, "--ctx", 64, "--windows", 4)
    assert res["windows"] == 4 and res["tokens"] == 4 * 31 and 1 < res["perplexity"] < 10
    res = run_json(capsys, "eval", stories_dir / "hf", "--base", stories_dir / "stories260K.gguf",
                   "--data", story_file, "--ctx", 64)
    assert res["kld"] == pytest.approx(0, abs=1e-6) and res["top1_agreement"] == 1.0
    code, out, _ = run(capsys, "eval", stories_dir / "hf", "--data", story_file, "--ctx", 64, "--quiet")
    assert code == 0 and "perplexity" in out.splitlines()[0]
    args = ("eval", stories_dir / "hf", "--data", story_file, "--ctx", 64, "--windows", 4)
    with_bos, raw = run_json(capsys, *args), run_json(capsys, *args, "--bos", "never")
    assert raw["tokens"] == with_bos["tokens"] == 4 * 31  # windows of 64 raw text tokens: as many scored,
    assert raw["perplexity"] != pytest.approx(with_bos["perplexity"])  # with other contexts


def test_eval_zero_shot(capsys, stories_dir, data_dir):
    res = run_json(capsys, "eval", stories_dir / "hf", "--tasks", "copa,piqa", "--limit", 5, "--no-ppl",
                   "--data-dir", data_dir)
    assert set(res["tasks"]) == {"copa", "piqa"}
    assert all(0 <= t["acc"] <= 1 and 0 <= t["acc_norm"] <= 1 and t["n"] == 5 for t in res["tasks"].values())
    assert "perplexity" not in res


def test_bench_json(capsys, stories_dir):
    res = run_json(capsys, "bench", stories_dir / "hf", "--threads", 1, "--prompt-tokens", 16,
                   "--gen-tokens", 4, "--repeats", 1)
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "bits_per_weight", "size_bytes",
                "peak_rss_bytes", "energy_j_per_token"):
        assert res[key] > 0, key
    assert res["threads"] == 1


def _error(capsys, *argv):
    code, out, err = run(capsys, *argv, "--quiet")
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmpress: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_errors_are_one_line(capsys, stories_dir, story_file, tmp_path, tokenizer):
    assert "no such model" in _error(capsys, "info", tmp_path / "missing")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    assert "truncated" in _error(capsys, "info", tmp_path / "bad.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a model" in _error(capsys, "eval", tmp_path / "notes.txt")
    assert "exceeds" in _error(capsys, "eval", stories_dir / "hf", "--data", story_file, "--ctx", 4096)
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in _error(capsys, "eval", stories_dir / "hf", "--data", tmp_path / "empty.txt")
    assert "unknown task" in _error(capsys, "eval", stories_dir / "hf", "--tasks", "nope")
    # a base whose tokenizer differs: a GPT-2-shaped model saved with a word-level vocabulary
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "a", "b"])}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tiny_model("gpt2", tokenizer)
    other.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk)
    lmpress.save(other, tmp_path / "other")
    assert "different tokenizers" in _error(capsys, "eval", stories_dir / "hf", "--base", tmp_path / "other",
                                            "--data", story_file, "--ctx", 64)


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(lmpress.LmpressError):
        main(["info", str(tmp_path / "missing"), "--debug"])


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "lmpress.cli", "info", "/no/such/path"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == "lmpress: error: no such model file or folder: /no/such/path"


def test_quantize_prune_compress_commands(capsys, stories_dir, story_file, tmp_path):
    res = run_json(capsys, "quantize", stories_dir / "hf", "--scheme", "w4g32", "--method", "hqq", "--out",
                   tmp_path / "q", "--data", story_file, "--ctx", 64)
    assert res["recipe"][0]["step"] == "HQQ" and res["size_bytes"] < res["input_size_bytes"]
    assert 4 < res["quantized_bits_per_weight"] < 5.2 and res["eval"]["kld"] > 0
    assert lmpress.load(tmp_path / "q").recipe == res["recipe"]
    assert "already exists" in _error(capsys, "quantize", stories_dir / "hf", "--scheme", "w4", "--out", tmp_path / "q")
    res = run_json(capsys, "prune", stories_dir / "hf", "--method", "magnitude", "--pattern", "2:4", "--out",
                   tmp_path / "p", "--no-eval")
    assert res["recipe"][0]["pattern"] == "2:4" and "eval" not in res
    w = lmpress.load(tmp_path / "p").model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    res = run_json(capsys, "compress", stories_dir / "hf", "--recipe", "w8a8-dynamic", "--out", tmp_path / "c",
                   "--force", "--no-eval")
    assert res["recipe"][0]["step"] == "W8A8Dynamic"
    assert "bits" in _error(capsys, "quantize", stories_dir / "hf", "--scheme", "w9", "--out", tmp_path / "x")
    assert "sparsity" in _error(capsys, "prune", stories_dir / "hf", "--sparsity", "1.0", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
