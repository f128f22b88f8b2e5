"""Zero-shot tasks: right answers on a real tiny model, batched scores equal to a one-at-a-time reference,
lm-eval's metrics, every data file's format, and the errors a user can hit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import lmpress
from lmpress.errors import BadInput
from lmpress.eval.scoring import sequence_logprobs
from lmpress.eval.tasks import (TASKS, Item, choice_correct, encode_requests, evaluate_items,
                                hellaswag_preprocess, load_task, mean_stderr, zero_shot)

STORY = "Once upon a time, there was a little girl named"
GREEDY = " Lily. She loved to play with her toys and her friends."  # stories260K's greedy continuation (no BOS)


def test_known_answers_on_stories(stories):
    scrambled = " friends. her and toys her with play to loved She Lily."
    items = [
        Item([STORY], [" Lily", " xqzv"], gold=0),
        Item([STORY], [" Qxzv", " Lily"], gold=1),
        Item([STORY], [scrambled, GREEDY], gold=1),
        Item([STORY + " Lily. She loved to play", " Lily. She loved to xqzv"], [" with her toys."], gold=0),
    ]
    got = evaluate_items(stories, items)
    assert got["acc"] == 1.0 and got["acc_norm"] == 1.0 and got["n"] == 4 and got["acc_stderr"] == 0.0
    # greedy items: right exactly when the continuation is the model's own greedy decoding
    greedy = evaluate_items(stories, [Item([STORY], [GREEDY], kind="greedy"),
                                      Item([STORY], [scrambled], kind="greedy")])
    assert greedy["acc"] == 0.5 and greedy["perplexity"] > 1.0


def _reference(lm, ctx: str, cont: str, prefix: list[int]) -> tuple[float, bool]:
    """One request, no batching: full-model logits, log_softmax, sum over the continuation's tokens."""
    tok = lm.tokenizer
    c = prefix + tok(ctx, add_special_tokens=False)["input_ids"]
    k = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c) - len(prefix):]
    ids = (c + k)[-(lm.max_positions + 1):]  # cut from the left to fit, the last token being no input
    start = len(ids) - len(k)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])).logits[0].double(), -1)  # [T-1, V]
    rows = lp[start - 1:]
    return float(rows.gather(-1, torch.tensor(k)[:, None]).sum()), bool((rows.argmax(-1) == torch.tensor(k)).all())


@pytest.mark.parametrize("bos", [False, True])
def test_batched_loglikelihoods_match_reference(tiny, bos):
    lm = tiny
    if bos:  # a tokenizer that adds BOS on its own: the context must start with it
        tok = copy.deepcopy(lm.tokenizer)
        tok.add_bos_token = True
        lm = lmpress.wrap(lm.model, tok, name=lm.name)
    long_ctx = " ".join(["The little dog ran to the big tree and barked at the cat."] * 40)  # > 256 positions
    pairs = [(STORY, " Lily"), (STORY, " Lily. She loved to play outside."), ("Tom", " had a red ball."),
             ("One day, a boy named Tim went to the park with his mom and his dad.", " They saw a bird"),
             ("Sue", " ran"), (long_ctx, " The end of the story."), ("The cat sat on the", " mat")]
    reqs = encode_requests(lm, pairs)
    assert max(len(c) + len(k) for c, k in reqs) == lm.max_positions + 1  # the long one was cut
    got = sequence_logprobs(lm.model, reqs, batch_tokens=64)  # several batches, right-padded
    prefix = [lm.bos_id] if bos else []
    for (ctx, cont), (c, _), (ll, greedy) in zip(pairs, reqs, got):
        ref_ll, ref_greedy = _reference(lm, ctx, cont, prefix)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (ctx[:30], cont)
        assert greedy == ref_greedy
        assert (c[0] == lm.bos_id) == (bos and ctx is not long_ctx)  # a cut context loses its BOS, as in lm-eval


def test_encode_pair_moves_whitespace_and_fills_empty_context(stories):
    a, b = encode_requests(stories, [("Tom went ", "home"), ("Tom went", " home")])
    assert a == b
    (c, k), = encode_requests(stories, [("", "Tom went home")])
    assert c == [stories.bos_id] and k == stories.tokenizer("Tom went home", add_special_tokens=False)["input_ids"]


def test_length_normalisation_flips_the_choice():
    # choice 0: -4 over 4 characters (-1.0 a character); choice 1: -6 over 20 (-0.3 a character)
    assert choice_correct([-4.0, -6.0], [4, 20], gold=1) == (False, True)
    assert choice_correct([-4.0, -6.0], [4, 20], gold=0) == (True, False)
    assert choice_correct([-2.0, -2.0], [3, 3], gold=0) == (True, True)  # ties go to the first, as np.argmax
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert mean_stderr(xs) == pytest.approx(np.std(xs, ddof=1) / math.sqrt(len(xs)))
    assert math.isnan(mean_stderr([1.0]))


def test_acc_norm_divides_by_the_raw_choice_length(stories):
    # lm-eval divides by len(choice) without the " " delimiter: check against the scores themselves
    item = Item([STORY], [" Lily", " a little girl who loved the park"], gold=1)
    (ll0, _), (ll1, _) = sequence_logprobs(stories.model, encode_requests(stories, item.pairs()))
    got = evaluate_items(stories, [item])
    assert got["acc"] == float(ll1 > ll0)
    assert got["acc_norm"] == float(ll1 / 32 > ll0 / 4)


@pytest.mark.parametrize("task", TASKS)
def test_each_file_loads(data_dir, task):
    items = load_task(task, data_dir, limit=3)
    assert len(items) == 3
    for it in items:
        pairs = it.pairs()
        assert 0 <= it.gold < len(pairs) and all(ctx and cont.startswith(" ") for ctx, cont in pairs)
        assert it.kind == ("greedy" if task == "lambada_openai" else "choice")
        n_choices = {"lambada_openai": 1, "winogrande": 2, "piqa": 2, "copa": 2, "boolq": 2, "siqa": 2,
                     "hellaswag": 4, "openbook_qa": 4}.get(task)  # ARC has 3 to 5
        assert n_choices in (None, len(pairs))
    if task == "hellaswag":
        it = items[0]  # ctx_b "a few women" is capitalised after ctx_a
        assert it.contexts == ["Pole vault: Pole vault is a sport where you run with a pole and stop and swing your "
                               "body. A few women"]
        assert it.continuations[0] == " go down a rock and stop."
    if task == "winogrande":
        assert len(items[0].contexts) == 2 and len(items[0].continuations) == 1


def test_hellaswag_preprocess():
    assert hellaswag_preprocess(" How to bake [title] Heat the oven. [step] Mix  it well. ") == \
        "How to bake. Heat the oven. Mix it well."
    assert hellaswag_preprocess("[header] Wash hands") == " Wash hands"


def test_zero_shot_end_to_end(stories, data_dir):
    out = zero_shot(stories, ["copa", "winogrande", "lambada_openai"], limit=4, data_dir=data_dir)
    assert list(out["tasks"]) == ["copa", "winogrande", "lambada_openai"]
    for name, r in out["tasks"].items():
        assert r["n"] == 4 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    assert out["tasks"]["winogrande"]["acc_norm"] == out["tasks"]["winogrande"]["acc"]  # shared continuation
    assert out["tasks"]["lambada_openai"]["perplexity"] > 1.0
    assert out["average_acc"] == pytest.approx(np.mean([r["acc"] for r in out["tasks"].values()]))
    assert out["seconds"] > 0


def test_errors(stories, data_dir, tmp_path, monkeypatch):
    with pytest.raises(BadInput, match="unknown task 'mmlu'.*arc_easy"):
        zero_shot(stories, ["mmlu"], data_dir=data_dir)
    monkeypatch.delenv("LMPRESS_DATA", raising=False)
    with pytest.raises(BadInput, match="--data-dir.*LMPRESS_DATA"):
        zero_shot(stories, ["copa"])
    with pytest.raises(BadInput, match="copa.jsonl"):
        zero_shot(stories, ["copa"], data_dir=tmp_path)
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "copa.jsonl").write_text('{"query": "x", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(BadInput, match="out of range"):
        zero_shot(stories, ["copa"], data_dir=tmp_path)
