"""bench: the keys it promises, honest size accounting, KV-cache decoding equal to a no-cache reference."""

from __future__ import annotations

import pytest
import torch

from lmpress.errors import BadInput
from lmpress.eval import bench as B

SMALL = dict(threads=1, prompt_tokens=8, gen_tokens=4, repeats=2, warmup=1)

FLOAT_KEYS = ["prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s", "decode_tokens_per_s_per_seq",
              "decode_ms_per_token", "energy_j_per_token", "decode_cpu_s_per_token", "memory_bits_per_weight"]
INT_KEYS = ["size_bytes", "memory_bytes", "params", "peak_rss_bytes", "threads", "batch", "prompt_tokens",
            "gen_tokens", "repeats", "warmup"]


def no_cache_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: re-run the whole sequence for every new token. Returns [B, steps + 1] like generate_greedy."""
    seq = ids
    with torch.inference_mode():
        for _ in range(steps + 1):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.fixture
def no_rapl(monkeypatch, tmp_path):
    monkeypatch.setattr(B, "RAPL_ROOT", tmp_path)
    monkeypatch.delenv(B.WATTS_ENV, raising=False)


def test_result_has_every_key_with_sane_values(stories, no_rapl):
    threads_before = torch.get_num_threads()
    r = B.bench(stories, batch=2, **SMALL)
    assert torch.get_num_threads() == threads_before  # restored
    for k in INT_KEYS:
        assert isinstance(r[k], int) and r[k] > 0, k
    for k in FLOAT_KEYS:
        assert isinstance(r[k], float) and r[k] > 0, k
    assert isinstance(r["load_s"], float) and r["load_s"] > 0
    assert (r["batch"], r["prompt_tokens"], r["gen_tokens"], r["threads"]) == (2, 8, 4, 1)
    assert r["size_bytes"] == stories.disk_bytes
    # stories260K is stored in float32: ~32 bits per weight on disk (plus the small safetensors header)
    assert 32 <= r["bits_per_weight"] < 33
    assert r["memory_bits_per_weight"] == pytest.approx(r["memory_bytes"] * 8 / r["params"])
    assert r["decode_tokens_per_s"] == pytest.approx(2 * r["decode_tokens_per_s_per_seq"])
    assert r["decode_ms_per_token"] == pytest.approx(1000 / r["decode_tokens_per_s_per_seq"])
    m = r["machine"]
    assert set(m) >= {"cpu", "logical_cores", "torch", "torch_threads"}
    assert m["torch_threads"] == 1 and m["logical_cores"] >= 1 and isinstance(m["cpu"], str)


def test_memory_counts_tied_embedding_once(tokenizer):
    from conftest import tiny_config, tiny_model

    lm = tiny_model("qwen2", tokenizer)
    cfg = tiny_config("qwen2")
    assert cfg.tie_word_embeddings
    emb, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    # hand count from the config: embedding once, per layer q/k/v (with bias), o, gate/up/down, two norms;
    # final norm; buffers: two rotary frequency tables of head_dim / 2 floats
    V, D, I, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = D // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    per_layer = (D * D + D) + 2 * (D * kv + kv) + D * D + 3 * D * I + 2 * D
    params = V * D + L * per_layer + D
    buffers = 2 * (hd // 2)
    assert B.model_storage(lm.model) == ((params + buffers) * 4, params)
    r = B.bench(lm, **SMALL)
    assert r["params"] == params and r["memory_bytes"] == (params + buffers) * 4
    assert r["bits_per_weight"] is None  # nothing on disk
    assert r["memory_bits_per_weight"] == pytest.approx(32, rel=1e-3)


def test_model_storage_counts_views_of_one_storage_once():
    m = torch.nn.Linear(4, 4, bias=False)
    m.register_buffer("rows", m.weight.data[:2])  # a view into the weight's storage
    assert B.model_storage(m) == (16 * 4, 16)


def check_kv_decode(lm, steps: int = 16):
    ids = B.bench_prompt(lm, 1, 12)
    got = B.generate_greedy(lm.model, ids, steps)
    assert got.tokens.shape == (1, steps + 1)
    assert torch.equal(got.tokens, no_cache_greedy(lm.model, ids, steps)), lm.name
    assert got.prefill_s > 0 and got.ttft_s >= got.prefill_s and got.decode_s > 0
    assert got.decode_energy_j is None  # no RAPL domains given


def test_kv_cache_decode_equals_no_cache_reference_tiny(tiny):
    check_kv_decode(tiny)


def test_kv_cache_decode_equals_no_cache_reference_stories(stories):
    check_kv_decode(stories)


def test_batch_rows_equal_their_single_decodes(tiny):
    ids = B.bench_prompt(tiny, 2, 10)
    assert not torch.equal(ids[0], ids[1])
    both = B.generate_greedy(tiny.model, ids, 8).tokens
    for i in range(2):
        assert torch.equal(both[i:i + 1], B.generate_greedy(tiny.model, ids[i:i + 1], 8).tokens)


def test_prompt_is_deterministic_and_starts_with_bos(stories):
    a, b = B.bench_prompt(stories, 2, 16), B.bench_prompt(stories, 2, 16)
    assert torch.equal(a, b) and a.shape == (2, 16)
    assert (a[:, 0] == stories.bos_id).all() and int(a.max()) < stories.config.vocab_size


@pytest.mark.parametrize("kwargs", [dict(threads=0), dict(batch=0), dict(prompt_tokens=0), dict(gen_tokens=0),
                                    dict(repeats=0), dict(warmup=-1), dict(batch=1.5), dict(threads=True),
                                    dict(prompt_tokens=200, gen_tokens=57)])
def test_bad_inputs_raise(tokenizer, kwargs):
    from conftest import tiny_model

    lm = tiny_model("llama", tokenizer)  # 256 positions
    with pytest.raises(BadInput) as e:
        B.bench(lm, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_watts_override_raises(tokenizer, monkeypatch):
    from conftest import tiny_model

    monkeypatch.setenv(B.WATTS_ENV, "lots")
    with pytest.raises(BadInput):
        B.bench(tiny_model("llama", tokenizer), **SMALL)


def test_energy_is_labelled_estimate_without_rapl(stories, no_rapl, monkeypatch):
    r = B.bench(stories, **SMALL)
    assert r["energy_source"] == B.ESTIMATE_LABEL and "estimate" in r["energy_source"]
    assert r["watts_per_core"] == B.WATTS_PER_CORE
    assert r["energy_j_per_token"] == pytest.approx(r["decode_cpu_s_per_token"] * B.WATTS_PER_CORE)
    monkeypatch.setenv(B.WATTS_ENV, "10")
    r = B.bench(stories, **SMALL)
    assert r["watts_per_core"] == 10.0
    assert r["energy_j_per_token"] == pytest.approx(r["decode_cpu_s_per_token"] * 10)


def test_rapl_domains_and_wraparound(tmp_path):
    def domain(name, uj, top):
        d = tmp_path / name
        d.mkdir()
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{top}\n")
        return d

    p0 = domain("intel-rapl:0", 900, 1000)
    domain("intel-rapl:0:0", 5, 1000)  # a subdomain (core), inside package 0: not counted again
    p1 = domain("intel-rapl:1", 100, 1000)
    assert B.rapl_domains(tmp_path) == [p0, p1]
    before = B.read_rapl([p0, p1])
    (p0 / "energy_uj").write_text("100\n")  # wrapped: 900 -> 1000 -> 100 is 200 uJ
    (p1 / "energy_uj").write_text("400\n")  # 300 uJ
    assert B.rapl_joules([p0, p1], before, B.read_rapl([p0, p1])) == pytest.approx(500e-6)


def test_bench_reads_rapl_when_readable(stories, tmp_path, monkeypatch):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("123\n")  # a counter that never moves: 0 J, but read as RAPL
    (d / "max_energy_range_uj").write_text("1000\n")
    monkeypatch.setattr(B, "RAPL_ROOT", tmp_path)
    r = B.bench(stories, **SMALL)
    assert r["energy_source"] == "rapl" and r["watts_per_core"] is None and r["energy_j_per_token"] == 0


def test_peak_rss_is_the_processs_own_not_its_parents():
    """A child started by a process that holds 1 GB reports its own (smaller) peak, not the parent's: ru_maxrss
    would carry the parent's over fork and exec on Linux."""
    import subprocess
    import sys

    held = bytearray(2**30)
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = "from lmpress.calibrate import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 900, child  # the child imports torch: a few hundred MB
    del held
