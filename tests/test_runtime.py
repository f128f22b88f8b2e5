"""The generation runtime: its forward pass equals transformers', and every way of generating (cached, batched,
continuously batched, speculative, streamed) gives the tokens that greedy decoding of the target gives."""

from __future__ import annotations

import pytest
import torch

import lmpress
from lmpress.errors import BadInput
from lmpress.eval.bench import generate_greedy
from lmpress.runtime import Engine, NativeRunner, SamplingParams, TextStream, native_support, speculative_generate

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = ["Once upon a time", "Lily", "The dog was very", "Tom and Sue went to the park and"]


@pytest.fixture(scope="module")
def tiny_pair(tokenizer):
    return {f: tiny_model(f, tokenizer) for f in ("llama", "qwen2")}


@pytest.fixture(params=["llama", "qwen2", "stories"])
def lm(request, tiny_pair, stories):
    return stories if request.param == "stories" else tiny_pair[request.param]


def ids_for(lm, n=12, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.config.vocab_size, (batch, n), generator=g)


def reference_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits.float()


def test_prefill_logits_match_transformers(lm):
    ids = ids_for(lm)
    ref = reference_logits(lm, ids)
    r = NativeRunner(lm, max_batch=2, max_len=64)
    assert (r.prefill(ids, all_logits=True) - ref).abs().max() < 1e-4
    assert (r.prefill(ids) - ref[:, -1]).abs().max() < 1e-4


def test_kv_cache_prefill_then_decode_equals_full_recompute(lm):
    """Across the prefill/decode boundary, with shared and per-row positions, and a chunked prefill."""
    ids = ids_for(lm)
    ref = reference_logits(lm, ids)
    r = NativeRunner(lm, max_batch=2, max_len=64)
    r.prefill(ids[:, :7])
    for t in range(7, 12):
        assert (r.decode(ids[:, t], t) - ref[:, t]).abs().max() < 1e-4
    r.prefill(ids[:1, :5], row=0)
    r.prefill(ids[1:, :3], row=1)
    for t in range(3):  # rows at different positions in one step
        out = r.decode(torch.stack([ids[0, 5 + t], ids[1, 3 + t]]), [5 + t, 3 + t])
        assert (out[0] - ref[0, 5 + t]).abs().max() < 1e-4 and (out[1] - ref[1, 3 + t]).abs().max() < 1e-4
    r.prefill(ids[:, :4])
    assert (r.prefill(ids[:, 4:], start=4, all_logits=True) - ref[:, 4:]).abs().max() < 1e-4


def test_kv_cache_at_the_context_limit(tiny_pair):
    lm = tiny_pair["llama"]
    e = Engine(lm, max_len=16)
    ids = ids_for(lm, n=10, batch=1)[0].tolist()
    c = e.generate(ids, SamplingParams(max_tokens=50, ignore_eos=True))
    assert c.finish_reason == "length" and len(ids) + len(c.token_ids) == 16 + 1  # the last is never cached
    full = generate_greedy(lm.model, torch.tensor([ids]), len(c.token_ids) - 1).tokens[0].tolist()
    assert c.token_ids == full
    with pytest.raises(BadInput, match="context limit"):
        e.generate(list(range(3, 19)))
    with pytest.raises(BadInput, match="context limit"):
        NativeRunner(lm, max_len=16).decode(torch.tensor([5]), 16)


def test_greedy_equals_transformers_generate(lm):
    e = Engine(lm, max_len=64)
    prompt = ids_for(lm, n=6, batch=1)
    got = e.generate(prompt[0].tolist(), GREEDY).token_ids
    assert got == generate_greedy(lm.model, prompt, 11).tokens[0].tolist()
    hf = lm.model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert got == hf[0, 6:].tolist()


def test_batched_and_continuous_batching_equal_single_runs(stories):
    e = Engine(stories, max_batch=3, max_len=96)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 14, 5, 11)]
    single = [e.generate(p, sp).token_ids for p, sp in zip(PROMPTS, params)]
    sched = e.scheduler()
    ids, got = {}, {}
    arrivals = {0: [0, 1], 2: [2], 6: [3]}  # step -> prompts arriving then (3 rows for 4 requests: one waits)
    step = 0
    while step <= max(arrivals) or sched.has_work():
        for i in arrivals.get(step, []):
            ids[sched.add_request(PROMPTS[i], params[i])] = i
        for ev in sched.step():
            if ev.finished:
                got[ids[ev.request_id]] = ev.completion.token_ids
        step += 1
    assert [got[i] for i in range(4)] == single
    assert [c.token_ids for c in e.generate_batch(PROMPTS, params[1])] == \
        [e.generate(p, params[1]).token_ids for p in PROMPTS]


def test_cancel_frees_the_row(stories):
    e = Engine(stories, max_batch=2, max_len=64)
    sched = e.scheduler()
    a = sched.add_request("Once", SamplingParams(max_tokens=30, ignore_eos=True))
    b = sched.add_request("Lily", SamplingParams(max_tokens=8, ignore_eos=True))
    sched.step()
    assert sched.counts() == {"active": 2, "waiting": 0, "max_batch": 2}
    sched.cancel(a)
    out = {}
    while sched.has_work():
        for ev in sched.step():
            if ev.finished:
                out[ev.request_id] = ev.completion
    assert out[a].finish_reason == "cancelled" and out[b].finish_reason == "length"
    assert out[b].token_ids == e.generate("Lily", SamplingParams(max_tokens=8, ignore_eos=True)).token_ids


def test_speculative_greedy_equals_target(stories, tiny_pair):
    target = Engine(stories, max_len=128)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = target.generate(PROMPTS[0], params).token_ids
    for draft_lm, k in ((tiny_pair["llama"], 3), (tiny_pair["qwen2"], 5)):  # unrelated drafts: mostly rejected
        c = speculative_generate(target, Engine(draft_lm, max_len=128), PROMPTS[0], params, k=k)
        assert c.token_ids == want and c.stats["target_passes"] <= 41
    c = speculative_generate(target, Engine(stories, max_len=128), PROMPTS[0], params, k=4)
    assert c.token_ids == want
    assert c.stats["acceptance_rate"] == 1.0 and c.stats["target_passes"] == 1 + 39 // 5 + 1


def test_speculative_sampling(stories, tiny_pair):
    """Sampling through a draft: reproducible with a seed; a draft equal to the target is (almost) always kept;
    an unrelated draft still gives the target's text style (its proposals get rejected and resampled)."""
    target = Engine(stories, max_len=128)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_k=50, seed=3, ignore_eos=True)
    self_draft = Engine(stories, max_len=128)
    a = speculative_generate(target, self_draft, PROMPTS[0], params, k=4)
    b = speculative_generate(target, self_draft, PROMPTS[0], params, k=4)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    assert a.stats["acceptance_rate"] > 0.9
    c = speculative_generate(target, Engine(tiny_pair["llama"], max_len=128), PROMPTS[0], params, k=3)
    assert c.stats["acceptance_rate"] < 0.5 and len(c.token_ids) == 30


def test_sampling_reproducible_and_top_k_one_is_greedy(stories):
    e = Engine(stories, max_len=64)
    p = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=40, seed=7, ignore_eos=True)
    a, b = e.generate("Once upon a time", p), e.generate("Once upon a time", p)
    assert a.token_ids == b.token_ids
    others = [e.generate("Once upon a time", SamplingParams(**{**p.__dict__, "seed": s})) for s in (8, 9)]
    assert any(o.token_ids != a.token_ids for o in others)
    greedy = e.generate("Once upon a time", SamplingParams(max_tokens=16, ignore_eos=True)).token_ids
    k1 = e.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=1.3, top_k=1, seed=1,
                                                         ignore_eos=True))
    assert k1.token_ids == greedy
    pen = e.generate("Once upon a time", SamplingParams(max_tokens=16, repetition_penalty=3.0, ignore_eos=True))
    assert pen.token_ids != greedy


def test_pick_token_filters():
    from lmpress.runtime import pick_token

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert pick_token(logits, SamplingParams()) == 0
    # penalty 4: the seen token 0 drops to 0.5, below token 1; a negative seen logit goes further down
    assert pick_token(logits, SamplingParams(repetition_penalty=4.0), seen=torch.tensor([0])) == 1
    g = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert picks == {0, 1}
    probs = torch.softmax(logits, 0)  # 0.61, 0.22, 0.14, 0.03: top_p 0.7 keeps the first two
    picks = {pick_token(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(200)}
    assert picks == {0, 1} and probs[0] < 0.7 < probs[0] + probs[1]


def test_stop_strings_and_streaming(stories):
    e = Engine(stories, max_len=96)
    full = e.generate("Once upon a time", SamplingParams(max_tokens=40, ignore_eos=True)).text
    assert "Lily" in full
    s = e.stream("Once upon a time", SamplingParams(max_tokens=40, stop=("Lily", "zzz"), ignore_eos=True))
    pieces = list(s)
    assert "".join(pieces) == s.completion.text == full[:full.index("Lily")]
    assert s.completion.finish_reason == "stop" and len(pieces) > 3
    assert lmpress.generate(stories, "Once upon a time", max_tokens=40, stop=("Lily",)).text == s.completion.text


def test_text_stream_holds_back_partial_stops(tokenizer):
    ids = tokenizer("Once upon a time there was a dog").input_ids
    ts = TextStream(tokenizer, ids[:1], stop=("there was",))
    out = "".join(ts.push(t) for t in ids[1:])
    assert out == ts.text == " upon a time " and ts.finished  # the space after "Once" is kept
    ts = TextStream(tokenizer, ids[:1], stop=("there is",))
    out = "".join(ts.push(t) for t in ids[1:]) + ts.flush()
    assert "Once" + out == tokenizer.decode(ids) and not ts.finished


def test_eos_ends_generation(stories):
    e = Engine(stories, max_len=64)
    full = e.generate("Once upon a time", SamplingParams(max_tokens=30, ignore_eos=True)).token_ids
    end = full[10]
    e.eos_ids = {end}  # as if it were the model's EOS
    c = e.generate("Once upon a time", SamplingParams(max_tokens=30))
    assert c.finish_reason == "stop" and c.token_ids == full[:full.index(end)]  # the EOS itself is not output
    assert e.generate("Once upon a time", SamplingParams(max_tokens=30, ignore_eos=True)).token_ids == full


def test_quantized_model_through_the_engine(tiny_pair):
    import copy

    from lmpress.recipe import RTN

    lm = copy.deepcopy(tiny_pair["qwen2"])
    lmpress.compress(lm, [RTN(bits=4, group_size=32)])
    assert native_support(lm) is None
    ids = ids_for(lm, n=8, batch=1)
    e = Engine(lm, max_len=64)
    assert (e.runner.prefill(ids, all_logits=True) - reference_logits(lm, ids)).abs().max() < 1e-4
    assert e.generate(ids[0].tolist(), GREEDY).token_ids == generate_greedy(lm.model, ids, 11).tokens[0].tolist()


def test_unsupported_family_falls_back_to_transformers(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    with pytest.warns(UserWarning, match="transformers forward"):
        e = Engine(lm, max_batch=2, max_len=64)
    assert not e.native
    ids = ids_for(lm, n=6, batch=1)
    assert e.generate(ids[0].tolist(), GREEDY).token_ids == generate_greedy(lm.model, ids, 11).tokens[0].tolist()
    out = e.generate_batch([ids[0].tolist(), [5, 6, 7]], GREEDY)
    assert out[0].token_ids == generate_greedy(lm.model, ids, 11).tokens[0].tolist()


def test_bad_requests(stories):
    e = Engine(stories, max_len=32)
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)):
        with pytest.raises(BadInput):
            SamplingParams(**bad)
    with pytest.raises(BadInput, match="empty"):
        e.generate([])
    with pytest.raises(BadInput, match="vocabulary"):
        e.generate([1, 99999])


def test_cli_generate_and_chat(capsys, stories_dir, monkeypatch):
    import io
    import json

    from lmpress.cli import main

    model = str(stories_dir / "hf")
    assert main(["generate", model, "--prompt", "Once upon a time", "--max-tokens", "12", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    want = Engine(lmpress.load(model), max_len=64).generate("Once upon a time", SamplingParams(max_tokens=12)).text
    assert out == want + "\n" and "decode 12 tok" in err
    assert main(["generate", model, "--prompt", "Once upon a time", "--max-tokens", "12", "--json", "--stop", "Lily",
                 "--draft", str(stories_dir / "stories260K.gguf"), "--draft-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["text"] == want[:want.index("Lily")] and res["finish_reason"] == "stop"
    assert res["acceptance_rate"] == 1.0 and res["engine"] == "native"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHow are you\n"))
    assert main(["chat", model, "--max-tokens", "8", "--json", "--system", "Be brief."]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["turns"]) == 2 and res["turns"][1]["prompt_tokens"] > res["turns"][0]["prompt_tokens"]
    assert main(["chat", model, "--max-tokens", "8", "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", model, "--prompt", "Once upon a time there", "--max-len", "4"]) == 2
    assert "context limit" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/work/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "/work/models/qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"])
def test_real_models_greedy_equals_reference(path):
    """The fast path's first 32 greedy tokens equal the reference path's, except after a near-tie of the
    reference's top two logits (reported in the message)."""
    from pathlib import Path

    if not Path(path).exists():
        pytest.skip(f"{path} not found")
    lm = lmpress.load(path)
    ids = torch.tensor([lm.tokenizer("def fibonacci(n):\n    " if "coder" in path else
                                     "The capital of France is").input_ids])
    ref = generate_greedy(lm.model, ids, 31).tokens[0].tolist()
    got = Engine(lm, max_len=64).generate(ids[0].tolist(), SamplingParams(max_tokens=32, ignore_eos=True)).token_ids
    if got != ref:
        i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
        logits = reference_logits(lm, torch.tensor([ids[0].tolist() + ref[:i]]))[0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] < 1e-3, f"token {i} differs and is no tie ({top2.tolist()})"


def test_bench_through_the_runtime(stories, tokenizer):
    from lmpress.eval import bench as B
    from lmpress.runtime import make_runner

    ids = B.bench_prompt(stories, 2, 8)
    runner, _ = make_runner(stories, max_batch=2, max_len=32)
    fast = B.generate_greedy_runtime(runner, ids, 6)
    assert torch.equal(fast.tokens, B.generate_greedy(stories.model, ids, 6).tokens)
    small = dict(threads=1, batch=2, prompt_tokens=8, gen_tokens=4, repeats=1, warmup=0)
    assert B.bench(stories, **small)["engine"] == "lmpress"
    assert B.bench(stories, **small, engine="transformers")["engine"] == "transformers"
    assert B.bench(tiny_model("gpt2", tokenizer), **small)["engine"] == "transformers"  # no native forward
