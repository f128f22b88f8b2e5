"""Distillation (distill/), masks during fine-tuning and the gradual schedule (prune/gradual.py)."""

import copy
import math
import dataclasses

import pytest
import torch

import lmpress
from lmpress import recipe as R
from lmpress.distill import losses
from lmpress.distill.student import drop_layers, evenly_spaced, layer_pairs
from lmpress.distill.train import distill, lr_at, teacher_topk, training_batches
from lmpress.errors import BadInput
from lmpress.nn import linear_weight
from lmpress.prune.gradual import MaskSchedule, cubic_sparsity, magnitude_masks

from conftest import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def teacher_model(tokenizer, layers=4):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = layers
    return lmpress.wrap(AutoModelForCausalLM.from_config(cfg), tokenizer, "teacher")


@pytest.fixture(scope="module")
def batches(tokenizer, stories_text):
    cfg = R.Distill(batch_size=2, seq_len=32, n_samples=8, eval_samples=2)
    return training_batches(tokenizer, cfg, 1, text=stories_text)


def kl_to(student, teacher, batches):
    with torch.no_grad():
        return sum(float(losses.kl_loss(student(input_ids=b).logits, teacher(input_ids=b).logits)) for b in batches)


def cfg(**kw):
    base = dict(steps=12, lr=1e-3, batch_size=2, seq_len=32, n_samples=8, eval_samples=2, warmup=0.1, device="cpu")
    return R.Distill(**{**base, **kw})


def test_losses_shapes_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert float(losses.kl_loss(a, a)) == pytest.approx(0, abs=1e-6)
    assert float(losses.kl_loss(a, b, 2.0)) > 0
    v, i = b.topk(11, dim=-1)  # k = V: the top-k KL is the full KL
    assert float(losses.topk_kl_loss(a, v, i)) == pytest.approx(float(losses.kl_loss(a, b)), rel=1e-5)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    assert float(losses.ce_loss(a, ids)) > 0


def test_drop_layers_student(tokenizer, batches):
    teacher = teacher_model(tokenizer, 6).model
    student, kept = drop_layers(teacher, 2)  # no data: evenly spaced, first and last kept
    assert kept == [0, 1, 3, 5] and evenly_spaced(6, 2) == [2, 4]
    assert student.config.num_hidden_layers == 4 and teacher.config.num_hidden_layers == 6
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert layer_pairs(4, 6, kept) == [(1, 1), (2, 2), (3, 4), (4, 6)]
    student, kept = drop_layers(teacher, 3, data=batches[0][:1])
    assert len(kept) == 3
    with pytest.raises(BadInput, match="drop-layers"):
        drop_layers(teacher, 6)


def test_kd_lowers_kl(stories, batches):
    train, held = batches  # stories260K's tokenizer is the tiny models'
    teacher = stories.model
    student, kept = drop_layers(teacher, 2)  # 5 -> 3 blocks
    before = kl_to(student, teacher, held)
    res = distill(student, teacher, train, cfg(lr=1e-3, hidden_weight=0.5), eval_batches=held, kept=kept)
    assert res["last"] < 0.5 * res["first"]
    assert kl_to(student, teacher, held) < 0.5 * before


def test_hidden_loss_with_projection_and_topk_cache(tokenizer, batches, tmp_path):
    train, _ = batches
    teacher = teacher_model(tokenizer).model
    small = copy.deepcopy(tiny_config("llama"))
    small.hidden_size, small.intermediate_size = 32, 64
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(small)
    res = distill(student, teacher, train, cfg(steps=4, hidden_weight=1.0))
    assert res["trained_params"] > sum(p.numel() for p in student.parameters())  # projections trained too

    path = tmp_path / "topk.safetensors"
    first = teacher_topk(teacher, train, 8, path)
    again = teacher_topk(None, train, 8, path)  # read back: the teacher is not needed
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    with pytest.raises(BadInput, match="cache"):
        teacher_topk(None, train[:1], 8, path)
    s2 = copy.deepcopy(student)
    res = distill(s2, None, train, cfg(steps=4, topk=8, cache=str(path)))
    assert res["last"] < res["first"]


def test_resume_equals_uninterrupted(tokenizer, batches, tmp_path):
    train, held = batches
    teacher = teacher_model(tokenizer).model
    s_full, _ = drop_layers(teacher, 2)
    s_cut = copy.deepcopy(s_full)
    c = cfg(steps=6, grad_accum=2, checkpoint_every=2, ce_weight=0.5)
    full = distill(s_full, teacher, train, dataclasses.replace(c, checkpoint_dir=str(tmp_path / "a")))
    part = distill(s_cut, teacher, train, dataclasses.replace(c, checkpoint_dir=str(tmp_path / "b")), stop_after=3)
    assert part["steps"] == 3
    s_new, _ = drop_layers(teacher, 2)  # a fresh process: weights from the checkpoint at step 2
    rest = distill(s_new, teacher, train, dataclasses.replace(c, checkpoint_dir=str(tmp_path / "b")))
    assert rest["resumed_from"] == 2 and rest["loss"] == full["loss"]
    for (n, a), b in zip(s_full.named_parameters(), s_new.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(BadInput, match="different run"):
        distill(s_new, teacher, train, dataclasses.replace(c, lr=1e-2, checkpoint_dir=str(tmp_path / "b")))


def test_masks_fixed_and_gradual(tokenizer, batches):
    train, _ = batches
    teacher = teacher_model(tokenizer, 2).model
    student = copy.deepcopy(teacher)
    lmpress.compress(lmpress.wrap(student, tokenizer), [R.Magnitude(0.5)])
    zeros = {n: linear_weight(m) == 0 for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)
             and not n.endswith("lm_head")}
    distill(student, teacher, train, cfg(steps=4))
    for n, m in student.named_modules():
        if n in zeros:
            w = linear_weight(m)
            assert torch.equal(w == 0, zeros[n]), n  # pruned weights stayed exactly zero, others trained

    student = copy.deepcopy(teacher)
    distill(student, teacher, train, cfg(steps=8, sparsity=0.5, sparsity_end=0.5, prune_every=2,
                                          sparsity_scope="global"))
    w = torch.cat([linear_weight(m).reshape(-1) for n, m in student.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")])
    assert float((w == 0).double().mean()) == pytest.approx(0.5, abs=1e-3)


def test_schedule_and_scopes():
    assert cubic_sparsity(0, 0.8, start=0, end=10) == 0
    assert cubic_sparsity(5, 0.8, start=0, end=10) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(12, 0.8, start=0, end=10) == 0.8
    c = cfg(steps=10, warmup=0.2, lr=1.0)
    assert [lr_at(s, c) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and lr_at(9, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    with torch.no_grad():
        b.weight.mul_(1000)  # far larger weights: a global threshold prunes layer a first
    m = magnitude_masks({"a": a, "b": b}, 0.5, "global")
    assert int((~m["a"]).sum()) + int((~m["b"]).sum()) == 32 and int((~m["a"]).sum()) == 32
    m = magnitude_masks({"a": a, "b": b}, 0.5, "layer")
    assert int((~m["a"]).sum()) == int((~m["b"]).sum()) == 16
    assert MaskSchedule.fixed({"a": a}).masks == {}


def test_stories_distill_runs_in_seconds(stories, stories_text):
    teacher = stories.model
    student, kept = drop_layers(teacher, 2)
    c = cfg(steps=10, seq_len=64, n_samples=8, eval_every=5, lr=1e-3)
    train, held = training_batches(stories.tokenizer, c, stories.bos_id, text=stories_text)
    res = distill(student, teacher, train, c, eval_batches=held, kept=kept)
    assert res["last"] < res["first"] and len(res["evals"]) == 2 and res["seconds"] < 60


def test_bad_distill_config():
    for bad in (dict(steps=0), dict(lr=-1), dict(optimizer="adam"), dict(data="wikitext2"),
                dict(kl_weight=0, ce_weight=0), dict(sparsity=1.0)):
        with pytest.raises(BadInput):
            R.Distill(**bad)


def test_cli_prune_structured_and_distill(stories_dir, tmp_path, capsys):
    import json

    from lmpress.cli import main

    S = str(stories_dir / "hf")
    out = tmp_path / "p"
    assert main(["prune", S, "--structured", "mlp", "--ratio", "0.25", "--recover", "2", "--seq-len", "32",
                 "--samples", "4", "--out", str(out), "--no-eval", "--json", "--quiet", "--train-device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in res["recipe"]] == ["StructuredPrune", "Distill"]
    assert lmpress.load(out).config.intermediate_size == 172 - 43  # floor(0.25 · 172) channels removed
    d = tmp_path / "d"
    assert main(["distill", "--teacher", S, "--drop-layers", "2", "--steps", "2", "--seq-len", "32", "--samples", "4",
                 "--out", str(d), "--no-eval", "--json", "--quiet", "--checkpoint-every", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["kept_blocks"]) == 3 and lmpress.load(d).config.num_hidden_layers == 3
    assert not (tmp_path / ".d.distill-ckpt").exists()  # removed once the model is saved
    for argv, msg in ((["prune", S, "--structured", "heads", "--ratio", "1.0"], "--ratio"),
                      (["prune", S, "--structured", "heads", "--ratio", "0"], "--ratio"),
                      (["prune", S, "--structured", "mlp", "--ratio", "0.5", "--importance", "nope"], "importance"),
                      (["distill", "--teacher", S, "--drop-layers", "5", "--steps", "1"], "drop-layers")):
        assert main(argv + ["--out", str(tmp_path / "x"), "--quiet"]) != 0
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
