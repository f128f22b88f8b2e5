"""Perplexity and KLD against straightforward references."""

import math

import pytest
import torch
import torch.nn.functional as F

import lmpress
from lmpress.data import llamacpp_windows, tokenize
from lmpress.errors import BadInput
from lmpress.eval.kld import kl_divergence
from lmpress.eval.perplexity import perplexity

from conftest import tiny_model


def reference_llamacpp_ppl(lm, text, ctx, bos="model"):
    """One window at a time, full logits, no batching: BOS + ctx-1 tokens, last ctx/2-1 predictions scored."""
    ids = tokenize(lm.tokenizer, text).tolist()
    bos = lm.bos_id if bos == "model" else bos
    nll, n = 0.0, 0
    for i in range(len(ids) // ctx):
        window = [bos] + ids[i * ctx:(i + 1) * ctx - 1] if bos is not None else ids[i * ctx:(i + 1) * ctx]
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([window])).logits[0].double(), -1)
        for p in range(ctx // 2, ctx - 1):
            nll -= logp[p, window[p + 1]].item()
            n += 1
    return math.exp(nll / n), n


def reference_stride_ppl(lm, text, ctx, stride):
    """The loop of transformers' perplexity guide, with labels = -100 on already-scored tokens."""
    ids = tokenize(lm.tokenizer, text)[None]
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = lm.model(input_ids, labels=target).loss
        n_valid = (target[:, 1:] != -100).sum().item()  # the model shifts labels left by one
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("ctx", [16, 64])
def test_llamacpp_protocol_matches_reference(tiny, stories_text, ctx):
    ref, n = reference_llamacpp_ppl(tiny, stories_text, ctx)
    got = perplexity(tiny, stories_text, ctx=ctx, batch_tokens=3 * ctx)  # batches of 3 with a ragged tail
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(ref, rel=1e-4)


def test_window_bos_choices(stories, stories_text):
    """--bos always (the issue's protocol), never (raw text windows), auto (BOS only when the tokenizer adds one
    to a text, as llama.cpp's llama-perplexity): each matches the reference loop with that first token."""
    from lmpress.eval.perplexity import window_bos
    from lmpress.eval.tasks import prefix_bos_id

    always = perplexity(stories, stories_text, ctx=32)
    never = perplexity(stories, stories_text, ctx=32, bos="never")
    ref, n = reference_llamacpp_ppl(stories, stories_text, 32, bos=None)
    assert never["tokens"] == n and never["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert never["perplexity"] != pytest.approx(always["perplexity"], rel=1e-3)
    assert window_bos(stories, "auto") == prefix_bos_id(stories)
    auto = perplexity(stories, stories_text, ctx=32, bos="auto")
    assert auto["perplexity"] == (always if prefix_bos_id(stories) is not None else never)["perplexity"]
    with pytest.raises(BadInput, match="bos"):
        perplexity(stories, stories_text, ctx=32, bos="sometimes")


@pytest.mark.parametrize("ctx,stride", [(64, 32), (48, 48), (40, 7)])
def test_stride_protocol_matches_reference(tiny, stories_text, ctx, stride):
    ref, n = reference_stride_ppl(tiny, stories_text, ctx, stride)
    got = perplexity(tiny, stories_text, ctx=ctx, protocol="stride", stride=stride)
    assert got["tokens"] == n
    if stride < ctx:  # overlapping windows score every token but the first exactly once
        assert n == len(tokenize(tiny.tokenizer, stories_text)) - 1
    assert got["perplexity"] == pytest.approx(ref, rel=1e-4)


def test_opt_family_matches_reference(tokenizer, stories_text):
    opt = tiny_model("opt", tokenizer)
    ref, _ = reference_llamacpp_ppl(opt, stories_text, 32)
    assert perplexity(opt, stories_text, ctx=32)["perplexity"] == pytest.approx(ref, rel=1e-4)


def test_real_tiny_model_is_good_at_its_stories(stories, stories_text):
    """stories260K was trained on such text: its perplexity is low; a random model's is near the vocab size."""
    ppl = perplexity(stories, stories_text, ctx=64)["perplexity"]
    assert ppl < 10
    rnd = perplexity(tiny_model("llama", stories.tokenizer), stories_text, ctx=64)["perplexity"]
    assert rnd > 200


def test_windows_limit(stories, stories_text):
    full = perplexity(stories, stories_text, ctx=32)
    two = perplexity(stories, stories_text, ctx=32, windows=2)
    assert two["windows"] == 2 and two["tokens"] == 2 * 15 and full["windows"] > 2


def test_kld_to_itself_is_zero(stories, stories_text):
    r = kl_divergence(stories, stories, stories_text, ctx=32)
    assert r["kld"] == 0.0 and r["top1_agreement"] == 1.0
    assert r["perplexity"] == pytest.approx(r["base_perplexity"])


def test_kld_matches_reference(tokenizer, stories_text):
    a, b = tiny_model("llama", tokenizer, seed=1), tiny_model("llama", tokenizer, seed=2)
    ctx = 32
    got = kl_divergence(a, b, stories_text, ctx=ctx, batch_tokens=64)
    ids = tokenize(tokenizer, stories_text).tolist()
    kl, agree, n = 0.0, 0, 0
    for w in llamacpp_windows(torch.tensor(ids), ctx, a.bos_id):
        with torch.no_grad():
            p = F.log_softmax(b.model(w.ids[None]).logits[0].double(), -1)[ctx // 2:ctx - 1]
            q = F.log_softmax(a.model(w.ids[None]).logits[0].double(), -1)[ctx // 2:ctx - 1]
        kl += (p.exp() * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += p.shape[0]
    assert got["tokens"] == n
    assert got["kld"] == pytest.approx(kl / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n)
    cache = []  # the base's log-probabilities kept once, then used instead of running the base
    first = kl_divergence(a, b, stories_text, ctx=ctx, batch_tokens=64, base_cache=cache)
    assert len(cache) == got["windows"] and first == {**got, "seconds": first["seconds"]}

    class Refuses(torch.nn.Module):
        config = b.model.config

        def forward(self, *a, **k):
            raise AssertionError("the base ran although its log-probabilities were cached")

    c = tiny_model("llama", tokenizer, seed=3)
    cached = kl_divergence(c, lmpress.wrap(Refuses(), tokenizer), stories_text, ctx=ctx, batch_tokens=64,
                           base_cache=cache)
    direct = kl_divergence(c, b, stories_text, ctx=ctx, batch_tokens=64)
    assert cached == {**direct, "seconds": cached["seconds"]}


def test_kld_refuses_other_tokenizer(stories, stories_text, tokenizer):
    from transformers import AutoTokenizer  # a different vocabulary: GPT-2 byte level would need a download,
    from tokenizers import Tokenizer, models, pre_tokenizers  # so build a small word-level one here

    vocab = {w: i for i, w in enumerate(["[UNK]", "Once", "upon", "a", "time"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    from transformers import PreTrainedTokenizerFast

    other = lmpress.wrap(stories.model, PreTrainedTokenizerFast(tokenizer_object=tk), name="other")
    with pytest.raises(BadInput, match="different tokenizers"):
        kl_divergence(other, stories, stories_text, ctx=32)


def test_bad_perplexity_inputs(stories, stories_text):
    with pytest.raises(BadInput, match="exceeds"):
        perplexity(stories, stories_text, ctx=4096)
    with pytest.raises(BadInput, match="fewer than one window"):
        perplexity(stories, "Once upon a time", ctx=64)
    with pytest.raises(BadInput, match="stride"):
        perplexity(stories, stories_text, ctx=64, protocol="stride", stride=100)


def test_scoring_leaves_no_inference_mode_behind(stories, stories_text):
    """zip() leaves the second generator suspended; the thread must not stay in inference mode."""
    kl_divergence(stories, stories, stories_text, ctx=32)
    assert not torch.is_inference_mode_enabled()
    assert torch.zeros(1).requires_grad_(True).requires_grad
