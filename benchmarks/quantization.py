"""One row per recipe (the quantization table of issue 3, the calibrated table of issue 4): for each recipe, bits per weight on disk, WikiText-2 perplexity (llama.cpp
protocol), KLD and top-1 agreement to the base, a zero-shot average on a stated subset, decode tokens/s.

usage: python benchmarks/quantization.py MODEL --name NAME [--windows 40] [--ctx 512] [--limit 50]
           [--tasks arc_easy,piqa,...] [--threads 2] [--recipes base,w8,...] [--out FILE.jsonl] [--no-bench]
           [--subprocess [--calib builtin:128x512] [--stream]]
Recipes: the names below (RECIPES) or any lmpress preset (gptq-w4g128, awq-w4g128, sparsegpt-2:4, ...), or
gguf:PATH — a GGUF file quantized by another tool from the same weights (llama.cpp's Q4_K_M, Q4_0 made with
../shared/scripts/llamacpp-quantize.py from the F32 GGUF), measured as it is on the same windows and base;
its row also gives `quantized_bits_per_weight` over the file's block weight matrices.
--subprocess compresses with `lmpress compress ... --json` in a child process, so that the row's compression
time and peak RAM (`compress_peak_rss_mb`: the child's, model load included) are the command's own.
Each recipe's row is appended to the JSONL file as soon as it is measured (a rerun skips recipes already
there); the markdown table is printed at the end. Needs LMPRESS_DATA (or --data-dir) for WikiText-2 and the
zero-shot sets.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmpress
from lmpress.data import load_text
from lmpress.recipe import HQQ, QAT, RTN, W8A8Dynamic, to_dict

RECIPES = {
    "base": [],
    "w8": [RTN(8, None, symmetric=True)],
    "w8a8-dynamic": [W8A8Dynamic()],
    "w4g128-rtn": [RTN(4, 128)],
    "w4g128-hqq": [HQQ(4, 128)],
    "w4-rtn": [RTN(4, None)],
    "w3g64-rtn": [RTN(3, 64)],
    "w3g64-hqq": [HQQ(3, 64)],
    "w2g32-hqq": [HQQ(2, 32)],
    "qat-w3g64": [QAT(bits=3, group_size=64, steps=100, lr=1e-4, n_samples=64, seq_len=256)],
}


def speed(base, names, a) -> list[dict]:
    """Decode and prefill speed only, round-robin: every recipe's model is built first, then each round runs one
    bench of each (round 0 warms up), so background load hits all rows alike; medians of the rounds."""
    import statistics

    models = {}
    for name in names:
        lm = lmpress.load(name.removeprefix("gguf:")) if name.startswith("gguf:") else copy.deepcopy(base)
        if steps_for(name):
            lmpress.compress(lm, steps_for(name))
        models[name] = lm
    rows = {name: {"recipe": name} for name in names}
    for t in a.speed_threads.split(","):
        runs = {name: [] for name in names}
        for r in range(a.speed_repeats + 1):
            for name, lm in models.items():
                b = lmpress.bench(lm, threads=int(t), prompt_tokens=64, gen_tokens=64, repeats=1)
                if r:
                    runs[name].append(b)
        for name in names:
            rows[name][f"decode_tokens_per_s_t{t}"] = statistics.median(b["decode_tokens_per_s"] for b in runs[name])
            rows[name][f"prefill_tokens_per_s_t{t}"] = statistics.median(b["prefill_tokens_per_s"] for b in runs[name])
    return list(rows.values())


BASE_LOGPROBS: list = []  # the base's log-probabilities on the evaluation windows, computed once per run


def steps_for(name):
    from lmpress.recipe import load_recipe

    if name.startswith("gguf:"):
        return None  # a model quantized elsewhere: measured as it is (no steps)
    return RECIPES[name] if name in RECIPES else load_recipe(name)


def gguf_layer_bits(path) -> float:
    """Bits per weight of a GGUF file's block weight matrices (blk.*, 2-D: the linear layers), block scales
    included: what `quantized_bits_per_weight` is for an lmpress model."""
    from gguf import GGUFReader

    ts = [t for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return sum(int(t.n_bytes) for t in ts) * 8 / sum(int(t.n_elements) for t in ts)


def compress_in_child(name, a) -> tuple[lmpress.LoadedModel, dict]:
    """`lmpress compress` in a child process; returns the saved model, loaded, and the command's JSON."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        cmd = [sys.executable, "-m", "lmpress.cli", "compress", a.model, "--recipe", name, "--out", str(out),
               "--no-eval", "--json", "--quiet", "--threads", str(a.threads), "--calib", a.calib]
        cmd += ["--stream"] if a.stream else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        res = json.loads(r.stdout)
        res["command"] = "lmpress " + " ".join(cmd[3:]).replace(str(out), "OUT")
        return lmpress.load(out), res


def measure(base, name, steps, text, a):
    extra = {}
    if name.startswith("gguf:"):  # e.g. llama.cpp's own Q4_K_M of the same weights (llama-quantize)
        path = Path(name.removeprefix("gguf:"))
        lm, secs, size = lmpress.load(path), float("nan"), path.stat().st_size
        extra = {"quantized_bits_per_weight": gguf_layer_bits(path), "gguf_types": lm.info.get("gguf_types")}
    elif a.subprocess and steps:
        lm, res = compress_in_child(name, a)
        secs, size = res["compress_s"], res["size_bytes"]
        extra = {"compress_peak_rss_mb": res["peak_rss_mb"], "command": res["command"],
                 "calibration": res.get("calibration", {}).get("spec"), "hqq_start": res.get("hqq_start")}
    else:
        lm = copy.deepcopy(base)
        t0 = time.perf_counter()
        if steps:
            lmpress.compress(lm, steps)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            out = lmpress.save(lm, Path(tmp) / "m")
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        extra = {"hqq_start": lm.info.get("hqq_start")}
    q = lmpress.kl_divergence(lm, base, text, ctx=a.ctx, windows=a.windows, progress=True, base_cache=BASE_LOGPROBS)
    tasks = lmpress.zero_shot(lm, a.tasks.split(","), limit=a.limit, data_dir=a.data_dir, progress=True)
    b = {"decode_tokens_per_s": float("nan")} if a.no_bench else \
        lmpress.bench(lm, threads=a.threads, prompt_tokens=64, gen_tokens=32, repeats=3)
    return {"recipe": name, "steps": [to_dict(s) for s in steps or []], "compress_s": secs, "size_bytes": size,
            "bits_per_weight": size * 8 / base.disk_params, "perplexity": q["perplexity"],
            "base_perplexity": q["base_perplexity"], "kld": q["kld"], "kld_stderr": q["kld_stderr"],
            "top1_agreement": q["top1_agreement"], "tokens": q["tokens"],
            "zero_shot_avg_acc": tasks["average_acc"], "zero_shot_avg_acc_norm": tasks["average_acc_norm"],
            "decode_tokens_per_s": b["decode_tokens_per_s"], "threads": a.threads, **extra}


def table(rows, a, model, speed_rows=()):
    """The markdown table; decode/prefill columns from the --speed-threads rows when there are any."""
    speed = {r["recipe"]: r for r in speed_rows}
    threads = sorted({k.rsplit("_t", 1)[1] for r in speed_rows for k in r if k.startswith("decode_tokens_per_s_t")})
    cols = [f"decode tok/s, {t} thr" for t in threads] + [f"prefill tok/s, {t} thr" for t in threads]
    head = ("| recipe | bits/weight (file) | perplexity | KLD | ± | top-1 | zero-shot acc | compress s |"
            + "".join(f" {c} |" for c in cols) + "\n|" + "---|" * (8 + len(cols)))
    lines = []
    for r in rows:
        sp = speed.get(r["recipe"], {})
        cells = [sp.get(f"decode_tokens_per_s_t{t}") for t in threads] + \
            [sp.get(f"prefill_tokens_per_s_t{t}") for t in threads]
        lines.append(f"| {r['recipe']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {r['kld']:.4f} | "
                     f"{r['kld_stderr']:.4f} | {r['top1_agreement']:.3f} | {r['zero_shot_avg_acc']:.3f} | "
                     f"{r['compress_s']:.1f} |" + "".join(" |" if c is None else f" {c:.1f} |" for c in cells))
    note = (f"\n{model}; WikiText-2 test, first {a.windows} windows of {a.ctx} (llama.cpp protocol, "
            f"{rows[0]['tokens']:,} tokens scored); KLD (± its standard error) and top-1 against the base (the "
            f"shipped weights in fp32); zero-shot: mean acc over {a.tasks} with --limit {a.limit}"
            + ("; speed: lmpress bench (64-token prompt, 64 greedy tokens), medians of round-robin rounds over "
               "all recipes (--speed-threads)." if speed_rows else "."))
    return "\n".join([head, *lines]) + "\n" + note


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--name", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--tasks", default="arc_easy,piqa,winogrande,hellaswag,copa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("LMPRESS_DATA"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out")
    ap.add_argument("--no-bench", action="store_true", help="skip decode timing (e.g. on a busy machine)")
    ap.add_argument("--speed-threads", help="only decode/prefill speed, at these thread counts (e.g. 1,2)")
    ap.add_argument("--report", action="store_true", help="only print the table from the JSONL files")
    ap.add_argument("--speed-repeats", type=int, default=5, help="bench repeats of --speed-threads runs (median)")
    ap.add_argument("--subprocess", action="store_true", help="compress with `lmpress compress` in a child process")
    ap.add_argument("--calib", default="builtin:128x512", help="calibration of --subprocess runs")
    ap.add_argument("--stream", action="store_true", help="--subprocess runs stream the weights from the file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out or Path(__file__).parent / "results" / f"quant-{a.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["recipe"]: json.loads(line) for line in out.read_text().splitlines()} \
        if out.exists() else {}
    speed_file = out.with_name(out.stem + "-speed.jsonl")
    if a.report:
        speed_rows = [json.loads(line) for line in speed_file.read_text().splitlines()] if speed_file.exists() else []
        print(table([done[n] for n in a.recipes.split(",") if n in done], a, Path(a.model).name, speed_rows))
        return
    base = lmpress.load(a.model)
    if a.speed_threads:
        rows = speed(base, a.recipes.split(","), a)
        keys = [k for k in rows[0] if k != "recipe"]
        print("| recipe | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for r in rows:
            print(f"| {r['recipe']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
        print(f"\n{Path(a.model).name}; greedy decode of 64 tokens after a 64-token prompt, median of "
              f"{a.speed_repeats} round-robin rounds, lmpress bench (its runtime engine over lmpress modules)")
        with open(speed_file, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "speed_repeats": a.speed_repeats}) + "\n")
        return
    text = load_text("wikitext2", a.data_dir)
    for name in a.recipes.split(","):
        if name in done:
            continue
        print(f"== {a.name} {name}", file=sys.stderr, flush=True)
        row = measure(base, name, steps_for(name), text, a)
        done[name] = row
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(table([done[n] for n in a.recipes.split(",") if n in done], a, Path(a.model).name))


if __name__ == "__main__":
    main()
