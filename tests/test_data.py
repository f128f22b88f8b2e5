"""Text sources and token windows."""

import json
import sys

import pytest
import torch

from lmpress.data import (builtin_text, calibration_windows, llamacpp_windows, load_text, stride_windows,
                          wikitext_available)
from lmpress.errors import BadInput


def test_builtin_corpus_is_offline_and_deterministic():
    a, b = builtin_text(), builtin_text()
    assert a == b and len(a) > 100_000 and "for" in a


def test_wikitext_from_data_dir(data_dir, monkeypatch):
    monkeypatch.delenv("LMPRESS_DATA", raising=False)
    text = load_text("wikitext2", data_dir)
    assert len(text.encode()) == 1_290_590 and text.startswith(" \n = Robert Boulter = \n")
    monkeypatch.setenv("LMPRESS_DATA", str(data_dir))
    assert wikitext_available() and load_text("wikitext2") == text


def test_wikitext_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LMPRESS_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    assert not wikitext_available(tmp_path)
    with pytest.raises(BadInput, match="--data-dir"):
        load_text("wikitext2", tmp_path)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    assert load_text(str(tmp_path / "a.txt")) == "plain text"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert load_text(str(tmp_path / "b.jsonl") + ":body") == "uno\n\ndos"
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(BadInput, match="c.jsonl:2"):
        load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(BadInput, match="no string field 'nope'"):
        load_text(str(tmp_path / "b.jsonl") + ":nope")


def test_empty_and_missing_text(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(BadInput, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(BadInput, match="no such text source"):
        load_text(str(tmp_path / "nothing.txt"))


def test_llamacpp_windows_layout():
    ids = torch.arange(100, 100 + 1000)
    ws = llamacpp_windows(ids, 64, bos=1)
    assert len(ws) == 1000 // 64
    for i, w in enumerate(ws):
        assert len(w.ids) == 64 and w.ids[0] == 1
        assert torch.equal(w.ids[1:], ids[i * 64:(i + 1) * 64 - 1])
        assert w.first_target == 33 and w.n_targets == 31
    assert len(llamacpp_windows(ids, 64, bos=1, limit=3)) == 3
    nobos = llamacpp_windows(ids, 64, bos=None)
    assert torch.equal(nobos[1].ids, ids[64:128])


def test_stride_windows_score_each_token_once():
    ids = torch.arange(1000)
    ws = stride_windows(ids, 128, 50)
    scored = torch.cat([w.ids[w.first_target:] for w in ws])
    assert torch.equal(scored, ids[1:])
    assert all(len(w.ids) <= 128 for w in ws)


def test_calibration_windows_seeded_and_disjoint_from_evaluation():
    ids = torch.arange(10_000)
    evals = llamacpp_windows(ids[:4096], 512, bos=None)
    reserved = [w.span for w in evals]
    a = calibration_windows(ids, 8, 256, seed=0, reserved=reserved)
    b = calibration_windows(ids, 8, 256, seed=0, reserved=reserved)
    c = calibration_windows(ids, 8, 256, seed=1, reserved=reserved)
    assert [w.span for w in a] == [w.span for w in b] != [w.span for w in c]
    spans = sorted([w.span for w in a] + reserved)
    assert all(s1[1] <= s2[0] for s1, s2 in zip(spans, spans[1:]))  # nothing overlaps
    assert all(torch.equal(w.ids, ids[w.span[0]:w.span[1]]) for w in a)
    with pytest.raises(BadInput, match="room for"):
        calibration_windows(ids, 30, 256, reserved=reserved)
