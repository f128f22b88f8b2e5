"""The structured-pruning and distillation table of issue 6, one JSONL row per configuration.

(a) MLP-channel pruning 25% / 50%, head pruning (1 of 3 query heads per KV group), depth pruning (30 → 20
    blocks by block influence), each before and after `--recover` distillation steps from the unpruned model;
(b) a student of `--student-blocks` blocks (the teacher's least influential blocks dropped) trained the same
    steps on the same data with distillation (KL) and with cross-entropy only.
Per row: parameters, WikiText-2 perplexity (llama.cpp protocol, --windows × --ctx), KLD and top-1 agreement to
the unpruned model, a zero-shot average (--tasks, --limit items each), decode tokens/s (lmpress.bench, --threads).
Also one row comparing torch's CSR sparse matmul with dense at 50% sparsity (the sparse storage format's
forward uses the dense path; this row is why).

usage: python benchmarks/structure.py MODEL [--out FILE.jsonl] [--windows 40] [--ctx 512] [--recover 200]
           [--tasks arc_easy,piqa,hellaswag] [--limit 100] [--threads 2] [--rows mlp25,mlp50,...] [--smoke]
       python benchmarks/structure.py RESULTS.jsonl --table      the markdown table of a results file
       python benchmarks/structure.py MODEL --speed [--rows base,mlp25,...] [--threads 1,2] [--repeats 5]
           [--speed-recipes fp32,w4g128+h8] [--speed-out FILE.jsonl]
--speed: decode speed only, side by side — the pruned models (no recovery: it changes no shape) and the base,
each also compressed with --speed-recipes (benchmarks/runtime.py's names), benched round-robin (lmpress.bench,
one round of each after the other, a warm-up round first), medians; speed-ups against the base of the same recipe.
Each row is appended as soon as it is measured; a rerun skips rows already in the file. Training text: the
built-in corpus (never the WikiText-2 test text). LMPRESS_DATA (or --data-dir) must hold WikiText-2 and the
zero-shot sets.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import lmpress
from lmpress.data import load_text
from lmpress.distill.student import drop_layers
from lmpress.distill.train import distill, training_batches
from lmpress.models import stored_weights
from lmpress.prune.structured import prune_structured
from lmpress.recipe import Distill

PRUNE = {  # name: (unit, ratio, importance, head_unit)
    "mlp25": ("mlp", 0.25, "activation", "query"),
    "mlp50": ("mlp", 0.50, "activation", "query"),
    "heads33": ("heads", 0.34, "activation", "query"),  # floor(0.34 · 3) = 1 of 3 queries per KV group
    "depth20": ("depth", 0.34, "influence", "query"),  # floor(0.34 · 30) = 10 blocks removed
}


def measure(lm, base, args, text) -> dict:
    row = {"params": sum(p.numel() for p in lm.model.parameters())}
    q = lmpress.kl_divergence(lm, base, text, ctx=args.ctx, windows=args.windows)
    row.update({k: q[k] for k in ("perplexity", "kld", "top1_agreement", "base_perplexity")})
    if args.tasks:
        z = lmpress.zero_shot(lm, args.tasks.split(","), limit=args.limit, data_dir=args.data_dir)
        row["zero_shot_avg"] = z["average_acc_norm"]
    if not args.no_bench:
        b = lmpress.bench(lm, threads=args.threads, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                          repeats=args.repeats)
        row["decode_tokens_per_s"] = b["decode_tokens_per_s"]
    return row


def sparse_vs_dense(threads: int) -> dict:
    """Median µs of y = x Wᵀ, x [1, 576], W [1536, 576] at 50% unstructured sparsity: dense vs torch CSR."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0
    x = torch.randn(1, 576, generator=g)
    csr = w.to_sparse_csr()

    def med(fn):
        for _ in range(20):
            fn()
        ts = []
        for _ in range(200):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e6
    dense_us = med(lambda: torch.nn.functional.linear(x, w))
    sparse_us = med(lambda: (csr @ x.t()).t())
    return {"dense_us": dense_us, "csr_us": sparse_us, "csr_over_dense": sparse_us / dense_us}


def speed(base, args) -> None:
    """Side-by-side decode speed of the base and the pruned rows (see the docstring)."""
    import statistics

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime import RECIPES

    calib = training_batches(base.tokenizer, Distill(steps=1, batch_size=4, seq_len=args.seq_len,
                                                     n_samples=16, device="cpu"), base.bos_id)[0][:4]
    shapes = {}
    for name in args.rows.split(","):
        if name == "base":
            shapes[name] = base.model
        elif name in PRUNE:
            unit, ratio, imp, hu = PRUNE[name]
            shapes[name] = copy.deepcopy(base.model)
            prune_structured(shapes[name], unit, ratio, imp, data=calib, head_unit=hu)
    models = {}
    for rec in args.speed_recipes.split(","):
        for name, m in shapes.items():
            lm = lmpress.LoadedModel(model=copy.deepcopy(m).eval(), tokenizer=base.tokenizer, source=args.model,
                                     kind="memory", disk_bytes=0, disk_params=stored_weights(m))
            if RECIPES[rec]:
                lmpress.compress(lm, RECIPES[rec])
            models[(rec, name)] = lm
    rows = []
    for t in [int(x) for x in str(args.threads).split(",")]:
        runs = {k: [] for k in models}
        for r in range(args.repeats + 1):
            for k, lm in models.items():
                b = lmpress.bench(lm, threads=t, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                  repeats=1)
                if r:
                    runs[k].append(b["decode_tokens_per_s"])
        for (rec, name), v in runs.items():
            rows.append({"row": name, "recipe": rec, "threads": t, "decode_tokens_per_s": statistics.median(v),
                         "params": sum(p.numel() for p in models[(rec, name)].model.parameters())})
    print("| row | recipe | threads | decode tok/s | × base (same recipe, threads) |\n|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["row"] == "base" and x["recipe"] == r["recipe"] and x["threads"] == r["threads"])
        r["speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        print(f"| {r['row']} | {r['recipe']} | {r['threads']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}× |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.speed_out:
        with open(args.speed_out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"model": args.model, "repeats": args.repeats, **r}) + "\n")


def table(path: str) -> None:
    """The markdown table of a results file (the quality rows; the sparse-matmul row as a line after it)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| row | parameters | perplexity | KLD | top-1 | zero-shot avg | decode tok/s | training s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "perplexity" not in r:
            continue
        train = f"{r['train_s']:.0f}" if "train_s" in r else "—"
        print(f"| {r['row']} | {r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['kld']:.4f} | "
              f"{r['top1_agreement']:.3f} | {r.get('zero_shot_avg', float('nan')):.3f} | "
              f"{r.get('decode_tokens_per_s', float('nan')):.1f} | {train} |")
    for r in rows:
        if r["row"] == "sparse-matmul":
            print("\nsparse-matmul: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in r.items() if k not in ("row", "model", "train")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", default="benchmarks/results/structure-smollm2-135m.jsonl")
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--recover", type=int, default=200, help="distillation steps of the recovery and of (b)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--student-blocks", type=int, default=15)
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", default="2", help="an integer (--speed: comma-separated counts)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--save-dir", help="also save the recovered models and the students here (one folder per row; "
                    "the distilled student is the draft of issue 6 (c))")
    ap.add_argument("--rows", default="base,mlp25,mlp50,heads33,depth20,student-kd,student-ce,sparse-matmul")
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the script runs (not a result)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results file MODEL")
    ap.add_argument("--speed", action="store_true", help="decode speed only, side by side (see the docstring)")
    ap.add_argument("--speed-recipes", default="fp32,w4g128+h8")
    ap.add_argument("--speed-out")
    args = ap.parse_args()
    if args.table:
        return table(args.model)
    if args.speed:
        base = lmpress.load(args.model)
        if args.rows == ap.get_default("rows"):
            args.rows = "base,mlp25,mlp50,heads33,depth20"
        return speed(base, args)
    args.threads = int(args.threads)
    if args.smoke:
        args.windows, args.recover, args.samples, args.seq_len, args.limit = 2, 2, 8, 64, 4
        args.tasks, args.repeats, args.gen_tokens = "arc_easy", 1, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {json.loads(line)["row"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    base = lmpress.load(args.model)
    text = load_text("wikitext2", args.data_dir)
    cfg = Distill(steps=max(args.recover, 1), lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                  n_samples=args.samples, eval_samples=4, device="cpu")
    train, held = training_batches(base.tokenizer, cfg, base.bos_id)
    common = {"model": args.model, "windows": args.windows, "ctx": args.ctx, "threads": args.threads,
              "train": {"steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch_size, "seq_len": cfg.seq_len,
                        "samples": cfg.n_samples, "data": cfg.data}, "smoke": args.smoke}

    def emit(name, row):
        row = {"row": name, **common, **row}
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def wrap(model):
        return lmpress.LoadedModel(model=model.eval(), tokenizer=base.tokenizer, source=args.model, kind="memory",
                                   disk_bytes=0, disk_params=stored_weights(model))

    calib = train[:4]

    def keep(name, model):
        if args.save_dir:
            lmpress.save(wrap(model), Path(args.save_dir) / name, overwrite=True)
    for name in args.rows.split(","):
        if name in done:
            print(f"skip {name} (in {out})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        if name == "base":
            emit(name, measure(base, base, args, text))
        elif name in PRUNE:
            unit, ratio, imp, hu = PRUNE[name]
            model = copy.deepcopy(base.model)
            rep = prune_structured(model, unit, ratio, imp, data=calib, head_unit=hu)
            info = {"unit": unit, "ratio": ratio, "importance": imp, "removed": rep["removed"]}
            emit(name, {**info, "recovered": 0, **measure(wrap(model), base, args, text),
                        "prune_s": time.perf_counter() - t0})
            t1 = time.perf_counter()
            res = distill(model, base.model, train, cfg, eval_batches=held)
            emit(f"{name}+kd{cfg.steps}", {**info, "recovered": cfg.steps, "train_s": time.perf_counter() - t1,
                                          "loss_first": res["first"], "loss_last": res["last"],
                                          **measure(wrap(model), base, args, text)})
            keep(f"{name}+kd{cfg.steps}", model)
        elif name in ("student-kd", "student-ce"):
            k = base.config.num_hidden_layers - args.student_blocks
            student, kept = drop_layers(base.model, k, data=calib)
            c = cfg if name == "student-kd" else Distill(**{**cfg.__dict__, "kl_weight": 0.0, "ce_weight": 1.0})
            res = distill(student, base.model if name == "student-kd" else None, train, c, eval_batches=held, kept=kept)
            emit(name, {"blocks": args.student_blocks, "kept": kept, "loss": "kl" if name == "student-kd" else "ce",
                        "train_s": res["seconds"], **measure(wrap(student), base, args, text)})
            keep(name, student)
        elif name == "sparse-matmul":
            emit(name, sparse_vs_dense(args.threads))
        else:
            raise SystemExit(f"unknown row {name}")


if __name__ == "__main__":
    main()
