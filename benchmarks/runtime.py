"""The runtime table of issue 5: decode and prefill tokens/s of transformers fp32 `generate` beside lmpress's
runtime (fp32, W8, W4 g128, W4 g32) and llama.cpp (Q8_0, Q4_0 of the same weights), at threads 1 and 2,
greedy, 128 new tokens; each decode figure also as a fraction of the memory-bandwidth roofline.

usage: python benchmarks/runtime.py [MODEL] [--threads 1,2] [--gen 128] [--prompt-tokens 64] [--repeats 3]
           [--variants transformers,fp32,w8,w4g128,w4g32[,w8a8,w8+h8,w4g128+h8,w4g32+h8]]
           [--llamacpp Q8_0.gguf,Q4_0.gguf]
           [--llamacpp-python /work/llvenv/bin/python] [--make-gguf DIR]
           [--draft MODEL --draft-k 4 --spec-variants fp32:w4g128+h8,...]
           [--out FILE.jsonl]
       python benchmarks/runtime.py [MODEL] --check-greedy 64 [--variants fp32,w8+h8,w4g128+h8]   fast path = reference?
       python benchmarks/runtime.py --overhead [--layers 30]    per-token Python cost of the decode loop

Variants: lmpress recipes by name (RECIPES below; "+h8" also quantizes the output head to int8, as llama.cpp's
Q4_0/Q8_0 files store theirs quantized — without it the fp32 head of a tied-embedding model is most of a W4
model's bytes per token).

Method. Variants are measured round-robin (variant A, B, C, then A, B, C again, `--repeats` rounds after one
warm-up round) and the medians reported, so background load hits every column alike; llama.cpp's GGUFs take
their turn in the same rounds (each stays loaded in its child process, which runs a round when told). One round of one variant
= a prefill of `--prompt-tokens` seeded random ids (eval.bench.bench_prompt) then `--gen` greedy decode
steps. Roofline: weight bytes read per decoded token (every linear layer's stored weights — codes, scales,
zeros — and the output head; an embedding lookup reads one row and is left out) ÷ copy bandwidth, where copy
bandwidth is STREAM's "copy" (bytes read + bytes written per second by torch's copy_ of a 256 MiB buffer at
that thread count). fraction = measured tok/s ÷ (bandwidth ÷ bytes per token).

llama.cpp columns need llama-cpp-python: it runs in a child process with `--llamacpp-python` (its own venv);
`--make-gguf DIR` writes F32, Q8_0 and Q4_0 GGUFs of MODEL (a .gguf) there first with ../shared/scripts
(gguf-to-f32.py, then llama.cpp's own quantizer).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lmpress
from lmpress.eval.bench import bench_prompt, generate_greedy, generate_greedy_runtime
from lmpress.recipe import RTN, W8A8Dynamic
from lmpress.runtime import Engine, NativeRunner, SamplingParams, speculative_generate
from lmpress.runtime.model import HFRunner

HEAD8 = RTN(8, None, symmetric=True, targets="lm_head", ignore=None)  # the output head too (llama.cpp quantizes it)
RECIPES = {"fp32": [], "w8": [RTN(8, None, symmetric=True)], "w8a8": [W8A8Dynamic()], "w4g128": [RTN(4, 128)],
           "w4g32": [RTN(4, 32)], "w8+h8": [RTN(8, None, symmetric=True), HEAD8],
           "w4g128+h8": [RTN(4, 128), HEAD8], "w4g32+h8": [RTN(4, 32), HEAD8]}
SCRIPTS = Path(__file__).resolve().parents[2] / "shared" / "scripts"
DEFAULT_MODEL = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth in bytes/s (read + write) at `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib << 18)  # float32: mib MiB
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return 2 * src.numel() * 4 / statistics.median(times)
    finally:
        torch.set_num_threads(before)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every linear layer's stored weights (tied output head included: it is read as the head)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or callable(getattr(mod, "lmpress_format", None)):
            tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def make_variant(base, name: str):
    if name in ("transformers", "fp32"):
        return base
    lm = copy.deepcopy(base)
    lmpress.compress(lm, RECIPES[name])
    return lm


def one_run(kind: str, lm, runner, ids, gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one prefill + `gen` greedy steps."""
    g = generate_greedy(lm.model, ids, gen) if kind == "transformers" else generate_greedy_runtime(runner, ids, gen)
    return ids.shape[1] / g.prefill_s, gen / g.decode_s


LLAMACPP_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, P, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=P + gen + 8, n_batch=P, n_threads=threads, n_threads_batch=threads, verbose=False)
rng = np.random.default_rng(1234)
prompt = [llm.token_bos()] + [int(t) for t in rng.integers(0, llm.n_vocab(), P - 1)]
# llama-cpp-python 0.3.x keeps no logits in llm.scores unless logits_all=True (which would compute the head on
# every prompt token): read the context's output row of the last evaluated token directly
last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
print("ready", flush=True)
for line in sys.stdin:  # one round per line, when the parent says
    llm.reset(); t0 = time.perf_counter(); llm.eval(prompt); t1 = time.perf_counter()
    tok = int(np.argmax(last())); t2 = time.perf_counter()
    for _ in range(gen):
        llm.eval([tok]); tok = int(np.argmax(last()))
    t3 = time.perf_counter()
    print(json.dumps({"prefill": P / (t1 - t0), "decode": gen / (t3 - t2)}), flush=True)
"""


class LlamaCpp:
    """One GGUF in llama.cpp at one thread count, in a child process (llama-cpp-python lives in its own venv)
    that stays loaded and runs one prefill + greedy decode round each time `round()` is called, so its rounds
    take their turn in the round-robin with lmpress's variants."""

    def __init__(self, python: str, path: str, threads: int, prompt_tokens: int, gen: int):
        self.name, self.path, self.threads = f"llama.cpp {Path(path).stem.split('-')[-1]}", path, threads
        self.proc = subprocess.Popen([python, "-c", LLAMACPP_CHILD, path, str(threads), str(prompt_tokens), str(gen)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"llama.cpp child for {path} did not start")

    def round(self) -> tuple[float, float]:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return r["prefill"], r["decode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def make_ggufs(model: str, out: Path, python: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / (Path(model).stem + "-F32.gguf")
    if not f32.exists():
        subprocess.run([python, str(SCRIPTS / "gguf-to-f32.py"), model, str(f32)], check=True)
    prefix = str(out / Path(model).stem)
    want = [f"{prefix}-{t}.gguf" for t in ("Q8_0", "Q4_0")]
    if not all(Path(p).exists() for p in want):
        subprocess.run([python, str(SCRIPTS / "llamacpp-quantize.py"), str(f32), prefix, "Q8_0", "Q4_0"], check=True)
    return want


def overhead(layers: int, gen: int = 128, repeats: int = 5) -> None:
    """µs per token per layer of the decode loop on a Llama with 64-wide layers (the matmuls cost ~nothing)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    lm = lmpress.wrap(model, tokenizer=None, name="overhead")
    runner = NativeRunner(lm, max_len=256)
    ids = torch.randint(0, 256, (1, 16))
    res = {"transformers": [], "lmpress": []}
    for _ in range(repeats):
        res["transformers"].append(generate_greedy(model, ids, gen).decode_s)
        res["lmpress"].append(generate_greedy_runtime(runner, ids, gen).decode_s)
    for k, v in res.items():
        us = statistics.median(v) / gen / layers * 1e6
        print(f"{k:13s} {us:7.1f} µs/token/layer  ({statistics.median(v) / gen * 1e3:.2f} ms/token, {layers} layers, "
              f"1 thread)")


def text_prompt(lm, prompt_tokens: int) -> list[int]:
    """BOS then the first tokens of the built-in corpus (CPython's documentation text): a natural prompt, as
    speculative decoding's acceptance rate depends on the text (seeded random ids make both models guess)."""
    from lmpress.data import load_text, tokenize

    ids = tokenize(lm.tokenizer, load_text("builtin")[:20 * prompt_tokens]).tolist()
    return ([lm.bos_id] if lm.bos_id is not None else []) + ids[:prompt_tokens - (lm.bos_id is not None)]


def speculative_row(base, draft_path: str, pair: str, k: int, prompt_tokens: int, gen: int, threads: int,
                    repeats: int) -> dict:
    """Target alone vs target drafted by the model at `draft_path`, pair = "TARGET:DRAFT" recipes (fp32: none;
    one name: both), alternating `repeats` rounds after a warm-up, medians; the outputs are checked identical.
    The draft is loaded afresh and compressed in place (no second copy beside a large target)."""
    tv, _, dv = pair.partition(":")
    dv = dv or tv
    torch.set_num_threads(threads)
    max_len = prompt_tokens + gen + k + 2
    target = Engine(make_variant(base, tv), max_len=max_len)
    draft_lm = lmpress.load(draft_path)
    if RECIPES[dv]:
        lmpress.compress(draft_lm, RECIPES[dv])
    draft = Engine(draft_lm, max_len=max_len)
    ids = text_prompt(base, prompt_tokens)
    p = SamplingParams(max_tokens=gen, ignore_eos=True)
    alone_s, spec_s, ties = [], [], []
    for r in range(repeats + 1):  # round 0 warms up; alternating, so load hits both alike
        alone = target.generate(ids, p)
        spec = speculative_generate(target, draft, ids, p, k)
        if spec.token_ids != alone.token_ids:
            ties.append(near_tie(target.lm, ids, alone.token_ids, spec.token_ids))
        if r:
            alone_s.append(alone.decode_tokens_per_s)
            spec_s.append(spec.decode_tokens_per_s)
    a, b = statistics.median(alone_s), statistics.median(spec_s)
    return {"variant": f"target {tv} + draft {draft_lm.name} {dv} k={k}", "threads": threads,
            "decode_tok_s": b, "target_alone_tok_s": a, "speedup": b / a,
            "acceptance_rate": spec.stats["acceptance_rate"], "identical": not ties, "ties": ties}


# Largest top-2 logit gap accepted as a float near-tie where the speculative output (the target's verification
# pass, several tokens at once) and the target's own decode steps pick different tokens: the two paths sum in
# different orders (fp32: ~1e-5 of the logits apart), so a gap below this can go either way.
TIE_GAP = 1e-3


def near_tie(lm, prompt: list[int], alone: list[int], spec: list[int]) -> dict:
    """Where two greedy outputs first differ, the reference forward's (transformers, float32) top-2 gap at that
    position; a gap above TIE_GAP is a real difference and stops the benchmark."""
    i = next((j for j, (x, y) in enumerate(zip(alone, spec)) if x != y), min(len(alone), len(spec)))
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([prompt + alone[:i]])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    if gap > TIE_GAP:
        raise AssertionError(f"speculative output differs from the target's greedy output at token {i}, where the "
                             f"reference's top two logits are {gap:.2e} apart (not a float tie)")
    return {"token": i, "top2_gap": gap}


def check_greedy(base, name: str, prompt: list[int], n: int, act: str) -> dict:
    """The fast path (NativeRunner: the fused step) against the reference path (HFRunner: transformers' forward
    over the same lmpress modules), stepped together through the reference's greedy tokens: how many of the
    first n greedy choices agree; where they first differ, the reference's top-2 logit gap there; and the
    largest |logit difference| between the paths over the steps before (how far apart the two arithmetics are
    on this model: a first difference whose gap is below it is a near-tie of that arithmetic).
    act: the packed layers' activations on one-row inputs — "q8" (as shipped: rounded to int8 per block of 32, a
    step function of its input, so the summation-order differences between the paths, ~1e-5 of the logits in
    fp32, flip codes and move logits by tenths) or "f32" (float activations: summation order only)."""
    from lmpress.nn.packed import PackedLinear

    lm = make_variant(base, name)
    saved, PackedLinear.native_act = PackedLinear.native_act, act
    try:
        fast, ref = NativeRunner(lm, max_len=len(prompt) + n + 1), HFRunner(lm, 1, len(prompt) + n + 1)
        first, gap, spread = None, None, 0.0
        with torch.inference_mode():
            lf, lr = fast.prefill(torch.tensor([prompt]))[0], ref.prefill(torch.tensor([prompt]))[0]
            for j in range(n):
                top = torch.topk(lr.float(), 2)
                tok = int(top.indices[0])
                if int(lf.argmax()) != tok:
                    first, gap = j, float(top.values[0] - top.values[1])
                    break
                spread = max(spread, float((lf - lr).abs().max()))
                if j + 1 < n:
                    lf = fast.decode(torch.tensor([tok]), len(prompt) + j)[0]
                    lr = ref.decode(torch.tensor([tok]), len(prompt) + j)[0]
    finally:
        PackedLinear.native_act = saved
    row = {"variant": f"lmpress {name}", "act": act, "tokens": n, "equal_tokens": n if first is None else first,
           "first_diff": first, "max_abs_logit_diff": spread}
    if first is not None:
        row["top2_gap"] = gap
        row["tie"] = gap <= max(TIE_GAP, 2 * spread)  # the margin moves by up to twice the largest difference
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="transformers,fp32,w8,w4g128,w4g32")
    ap.add_argument("--llamacpp", default="", help="comma-separated GGUFs to run in llama.cpp")
    ap.add_argument("--llamacpp-python", default="/work/llvenv/bin/python")
    ap.add_argument("--make-gguf", help="folder: make F32/Q8_0/Q4_0 GGUFs of MODEL there and run them")
    ap.add_argument("--draft", help="draft model: adds a speculative-decoding row (greedy, checked identical)")
    ap.add_argument("--draft-k", default="4", help="tokens the draft proposes per round (comma-separated: a row each)")
    ap.add_argument("--spec-variants", default="fp32:w4g128+h8",
                    help="comma-separated TARGET:DRAFT recipe pairs for the speculative rows (one name: both)")
    ap.add_argument("--check-greedy", type=int, metavar="N",
                    help="instead of timing: the first N greedy tokens of each lmpress variant, fast path against "
                         "the reference path (prompt: BOS + --prompt-tokens of the built-in corpus)")
    ap.add_argument("--out", help="append the rows to this JSONL file")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--layers", type=int, default=30)
    a = ap.parse_args()
    if a.overhead:
        overhead(a.layers)
        return

    threads = [int(t) for t in a.threads.split(",")]
    base = lmpress.load(a.model)
    names = [n for n in a.variants.split(",") if n and n != "none"]
    if a.check_greedy:
        torch.set_num_threads(threads[0])
        prompt = text_prompt(base, a.prompt_tokens)
        rows = [check_greedy(base, n, prompt, a.check_greedy, act) for n in names if n != "transformers"
                for act in ("q8", "f32")]
        print(f"{os.path.basename(a.model)}: first {a.check_greedy} greedy tokens, fast path (fused native step) "
              f"against the reference path (transformers forward over the same modules)\n")
        print("| variant | activations | tokens equal | first difference | reference top-2 gap there | "
              "max \\|Δ logit\\| before |\n|---|---|---|---|---|---|")
        for r in rows:
            gap = f"{r['top2_gap']:.2e} ({'near-tie' if r['tie'] else 'NOT a tie'})" if "top2_gap" in r else "—"
            first = "—" if r["first_diff"] is None else r["first_diff"]
            print(f"| {r['variant']} | {r['act']} | {r['equal_tokens']} / {r['tokens']} | {first} | {gap} | "
                  f"{r['max_abs_logit_diff']:.1e} |")
        write_rows(a, rows)
        return
    variants = {n: make_variant(base, n) for n in names}
    runners = {n: NativeRunner(lm, max_len=a.prompt_tokens + a.gen + 1) for n, lm in variants.items()
               if n != "transformers"}
    ids = bench_prompt(base, 1, a.prompt_tokens)
    ggufs = [g for g in a.llamacpp.split(",") if g]
    if a.make_gguf:
        ggufs += make_ggufs(a.model, Path(a.make_gguf), a.llamacpp_python)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        bw = copy_bandwidth(t)
        cpp = [LlamaCpp(a.llamacpp_python, g, t, a.prompt_tokens, a.gen) for g in ggufs]
        runs: dict[str, list] = {n: [] for n in [*names, *(c.name for c in cpp)]}
        try:
            for r in range(a.repeats + 1):  # round 0 warms up
                for n in names:
                    res = one_run(n, variants[n], runners.get(n), ids, a.gen)
                    if r:
                        runs[n].append(res)
                for c in cpp:
                    res = c.round()
                    if r:
                        runs[c.name].append(res)
        finally:
            for c in cpp:
                c.close()
        sizes = {c.name: os.path.getsize(c.path) for c in cpp}
        for n, got in runs.items():
            wb = sizes[n] if n in sizes else weight_bytes_per_token(variants[n].model)
            dec = statistics.median(x[1] for x in got)
            rows.append({"variant": n if n in ("transformers", *sizes) else f"lmpress {n}", "threads": t,
                         "prefill_tok_s": statistics.median(x[0] for x in got), "decode_tok_s": dec,
                         "weight_bytes": wb, "copy_bw_gb_s": bw / 1e9, "roofline_fraction": dec * wb / bw})
    if a.draft:
        rows += [speculative_row(base, a.draft, v, int(k), a.prompt_tokens, a.gen, t, a.repeats)
                 for v in a.spec_variants.split(",") for k in a.draft_k.split(",") for t in threads]

    ref = {r["threads"]: r["decode_tok_s"] for r in rows if r["variant"] == "transformers"}
    print(f"{Path(a.model).name}: prompt {a.prompt_tokens} tokens, {a.gen} new tokens greedy, median of "
          f"{a.repeats} (round-robin)\n")
    print("| variant | threads | prefill tok/s | decode tok/s | × transformers | MB/token | roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        x = r["decode_tok_s"] / ref[r["threads"]] if r["threads"] in ref else None
        mb = r.get("weight_bytes")
        print(f"| {r['variant']} | {r['threads']} | {r.get('prefill_tok_s', float('nan')):.1f} | "
              f"{r['decode_tok_s']:.1f} | {'' if x is None else f'{x:.2f}×'} | "
              f"{'' if mb is None else f'{mb / 1e6:.1f}'} | "
              f"{'' if 'roofline_fraction' not in r else format(r['roofline_fraction'], '.0%')} |")
    for r in rows:
        if "acceptance_rate" in r:
            print(f"\n{r['variant']} at {r['threads']} threads: acceptance {r['acceptance_rate']:.2f}, "
                  f"{r['decode_tok_s']:.1f} vs {r['target_alone_tok_s']:.1f} tok/s alone ({r['speedup']:.2f}×)")
    write_rows(a, rows)


def write_rows(a, rows: list[dict]) -> None:
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if a.out:
        with open(a.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"model": a.model, **r}) + "\n")


if __name__ == "__main__":
    main()
