"""GEMV speed of lmpress's native kernels beside torch, on the linear shapes of SmolLM2-135M and Qwen2.5-0.5B.

    python benchmarks/kernels.py [--threads 1 2] [--rounds 5] [--rows 1] [--mb 64] [--shapes smol qwen]

One decode step reads every weight once from memory, so each variant cycles over enough copies of its layer to
hold --mb MB (well past the last-level cache; "cold", as in a real model) and reports the median time per call
over rounds run interleaved (variant after variant inside each round, so machine noise hits all alike), the
weight bytes read per second, that rate as a fraction of the copy bandwidth (a large torch copy, read + write
bytes), and the speed-up over torch fp32 F.linear. Variants:
  fp32          torch F.linear, float32 weight
  torch-int8    torch's dynamic quantized Linear (torch.ao quantize_dynamic: fbgemm, per-tensor activations)
  w8a8          lmpress Int8DynamicLinear on the native kernel (same numbers as fbgemm)
  int8          lmpress packed-int8 per channel, weight-only (fp32 activations)
  int4-gG       lmpress packed-int4, group G, fp32 activations ("-q8": activations rounded to int8 per 32)
Speed is never asserted by the tests; run this on a quiet machine for numbers to quote.

    python benchmarks/kernels.py --gemv [--threads 1] [--rounds 15] [--rows 1] [--baseline OLD/_native...so]

--gemv: the native GEMV alone (the C call, no module or torch around it) on every linear shape of SmolLM2-135M and
Qwen2.5-0.5B (attention, MLP, the tied head) in the formats of the decode path — packed-int4 g32 / g128,
packed-int8 per channel (uint8 codes and fp16 zeros, as RTN(8, symmetric) stores it) and Int8WeightLinear
(int8 codes, fp32 scales) — with "q8" activations, plus a tiny shape whose time is the fixed cost of a call.
--baseline loads a second build of the extension (e.g. a worktree of an older commit) and runs it interleaved
with this one, call for call, printing both and the ratio.

    python benchmarks/kernels.py --decode MODEL [--variants w8,w4g128,w4g32+h8] [--gen 64] [--rounds 5]
                                 [--baseline OLD/_native...so]

    python benchmarks/kernels.py --decode MODEL --profile [--threads 1 2] [--variants w4g128+h8]

--profile: µs per token in each phase of the fused step (norms, activation preparation, each group of linears,
RoPE, attention, SiLU, head, and the Python around it) at each thread count, and each phase's speed-up.

--decode: whole fused decode steps (NativeRunner, one row, the first --threads value; 1 unless given) of lmpress variants of MODEL (the recipes of
benchmarks/runtime.py), each build in turn per round (a plan per build: a plan belongs to the library that made
it), greedy from the same prompt; tokens/s from the median step time, and whether the builds chose the same
tokens. At one thread the time is the thread's CPU time
(time.thread_time), so a shared machine's other processes cost less of the measure; at more, the wall clock.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from lmpress import kernels
from lmpress.compress import compress
from lmpress.nn.int8_dynamic import Int8DynamicLinear
from lmpress.recipe import RTN

SHAPES = {"smol": [(576, 1536), (1536, 576)], "qwen": [(896, 4864), (4864, 896)]}  # (in, out): MLP up / down


def copy_bandwidth(mb: int = 512) -> float:
    """GB/s of a large tensor copy (bytes read + written)."""
    src = torch.empty(mb * 2**20 // 4).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(m: torch.nn.Module) -> int:
    if isinstance(m, torch.nn.Linear):
        return m.weight.numel() * 4
    if hasattr(m, "weight") and callable(m.weight):  # torch.ao dynamic Linear
        return m.weight().numel()
    return sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n != "bias")


def variants(in_f: int, out_f: int) -> dict[str, callable]:
    """name → a function building one layer of that variant (from the same float weight)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f)

    def fp32():
        lin = torch.nn.Linear(in_f, out_f)
        lin.load_state_dict(base.state_dict())
        return lin

    def torch_int8():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(fp32()), {torch.nn.Linear},
                                                      dtype=torch.qint8)[0]

    def rtn(bits, group, act="f32"):
        def make():
            m = compress(torch.nn.Sequential(fp32()), [RTN(bits, group)])[0]
            m.native_act = act
            return m
        return make

    return {"fp32": fp32, "torch-int8": torch_int8, "w8a8": lambda: Int8DynamicLinear.from_linear(fp32()),
            "int8": rtn(8, None), "int4-g128": rtn(4, 128), "int4-g32": rtn(4, 32),
            "int4-g128-q8": rtn(4, 128, "q8"), "int4-g32-q8": rtn(4, 32, "q8")}


def bench_shape(in_f: int, out_f: int, threads: int, rounds: int, rows: int, mb: int) -> list[dict]:
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    x = torch.randn(rows, in_f)
    layers = {}
    for name, make in variants(in_f, out_f).items():
        one = make()
        n = max(2, mb * 2**20 // weight_bytes(one))
        layers[name] = [one] + [copy.deepcopy(one) for _ in range(n - 1)]
    per_call = {name: [] for name in layers}
    with torch.inference_mode():
        for name, mods in layers.items():  # warm up
            for m in mods[:4]:
                m(x)
        for _ in range(rounds):
            for name, mods in layers.items():
                t = time.perf_counter()
                for m in mods:
                    m(x)
                per_call[name].append((time.perf_counter() - t) / len(mods))
    out = []
    for name, ts in per_call.items():
        s = statistics.median(ts)
        out.append({"shape": f"{in_f}→{out_f}", "threads": threads, "variant": name, "us": s * 1e6,
                    "gbs": weight_bytes(layers[name][0]) / s / 1e9, "copies": len(layers[name])})
    fp = next(r["us"] for r in out if r["variant"] == "fp32")
    for r in out:
        r["speedup"] = fp / r["us"]
    return out


# (in, out) of every linear layer of a decode step (attention q/o, k/v, MLP gate/up, down, tied head) + a tiny one
GEMV_SHAPES = {"smol": [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)],
               "qwen": [(896, 896), (896, 128), (896, 4864), (4864, 896), (896, 151936)],
               "tiny": [(64, 8)]}
GEMV_FORMATS = ("int4-g32", "int4-g128", "int8-packed", "int8-wo")


def load_native(path: str):
    """A second copy of the extension from another build (its own dlopen: nothing shared with this one)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader("lmpress.kernels._native", path)
    spec = importlib.util.spec_from_file_location("lmpress.kernels._native", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def gemv_layer(fmt: str, in_f: int, out_f: int, seed: int) -> tuple[list[torch.Tensor], tuple]:
    """(tensors, the argument tuple of _native.linear after x/M) of one random layer of a format."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "int8-wo":
        w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g)
        s = torch.rand(out_f, generator=g) * 0.01
        return [w, s], (in_f, w.data_ptr(), in_f, out_f, 8, 0, s.data_ptr(), 0, 0, 0)
    bits = 4 if fmt.startswith("int4") else 8
    group = int(fmt.split("-g")[1]) if "-g" in fmt else 0
    ng = -(-in_f // group) if group else 1
    row = -(-in_f * bits // 8)
    w = torch.randint(0, 256, (out_f, row), dtype=torch.uint8, generator=g)
    s = (torch.rand(ng, out_f, generator=g) * 0.01 + 1e-3).half()
    z = torch.randint(0, 2**bits, (ng, out_f), generator=g).half()
    return [w, s, z], (in_f, w.data_ptr(), row, out_f, bits, 1, s.data_ptr(), z.data_ptr(), 1, group)


def bench_gemv(natives: dict, fmt: str, in_f: int, out_f: int, threads: int, rounds: int, rows: int, mb: int) -> dict:
    """Median µs per call of each build in natives (name → module), interleaved, cycling over copies of the layer
    that together exceed `mb` MB (cold weights, as in a decode step)."""
    one, _ = gemv_layer(fmt, in_f, out_f, 0)
    wbytes = sum(t.numel() * t.element_size() for t in one)
    n = max(1, min(256, mb * 2**20 // wbytes + 1))
    layers = [gemv_layer(fmt, in_f, out_f, i) for i in range(n)]
    reps = max(1, 2000 // n) if wbytes < 2**16 else 1  # tiny shapes: many calls per timing
    x = torch.randn(rows, in_f)
    y = torch.empty(rows, out_f)
    # _native.linear(x, M, I, w, row_bytes, O, bits, w_unsigned, scales, zeros, sf16, group, bias, y, act=q8, isa,
    # threads[, tiles]): builds that take tiles get them precomputed, as a decode plan keeps them
    calls = [(x.data_ptr(), rows, *args, 0, y.data_ptr(), kernels.ACTS["q8"], -1, threads) for _, args in layers]
    tiles = [kernels.tile_params(t[1], t[2]) if "-g" in fmt else None for t, _ in layers]
    tiled = [c + (t.data_ptr() if t is not None else 0,) for c, t in zip(calls, tiles)]
    # at one thread, this thread's CPU time: the machine is shared, and time spent descheduled is not the kernel's
    clock = time.thread_time if threads == 1 else time.perf_counter
    times = {k: [] for k in natives}
    args = {k: tiled if hasattr(nat, "tile_params") else calls for k, nat in natives.items()}
    for k, nat in natives.items():  # warm-up
        for c in args[k][:4]:
            nat.linear(*c)
    for _ in range(rounds):
        for k, nat in natives.items():
            fn, cs = nat.linear, args[k]
            t = clock()
            for _ in range(reps):
                for c in cs:
                    fn(*c)
            times[k].append((clock() - t) / (reps * len(calls)))
    return {k: (statistics.median(v), wbytes) for k, v in times.items()}


def main_gemv(a) -> None:
    natives = {"this": kernels._native}
    if a.baseline:
        natives = {"base": load_native(a.baseline), **natives}
    print(f"kernels --gemv: isa={kernels.isa()}; rows={a.rows}; threads={a.threads}; median of {a.rounds} rounds; "
          f"builds: {', '.join(natives)}\n")
    cols = " | ".join(f"{k} µs | {k} GB/s" for k in natives)
    print(f"| shape in→out | format | KB | {cols} |" + (" speed-up |" if len(natives) > 1 else ""))
    print("|---|---|---|" + "---|---|" * len(natives) + ("---|" if len(natives) > 1 else ""))
    for threads in a.threads:
        for key in a.shapes:
            for in_f, out_f in GEMV_SHAPES[key]:
                if a.only and f"{in_f}:{out_f}" not in a.only:
                    continue
                for fmt in a.formats:
                    r = bench_gemv(natives, fmt, in_f, out_f, threads, a.rounds, a.rows, a.mb)
                    wb = next(iter(r.values()))[1]
                    cells = " | ".join(f"{s * 1e6:.1f} | {wb / s / 1e9:.1f}" for s, _ in r.values())
                    ratio = f" {r['base'][0] / r['this'][0]:.2f}× |" if len(natives) > 1 else ""
                    print(f"| {in_f}→{out_f} | {fmt} | {wb // 1024} | {cells} |{ratio}", flush=True)


def main_decode(a) -> None:
    import lmpress
    from lmpress.runtime import NativeRunner
    from runtime import RECIPES  # benchmarks/runtime.py, beside this file

    natives = {"this": kernels._native}
    if a.baseline:
        natives = {"base": load_native(a.baseline), **natives}
    mine = kernels._native
    threads = a.threads[0]  # --decode takes one thread count (the first given)
    torch.set_num_threads(1)
    kernels.set_num_threads(threads)
    base_lm = lmpress.load(a.decode)
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    # at one thread, this thread's CPU time (the fused step runs on it); with helpers, the wall clock
    clock = time.thread_time if threads == 1 else time.perf_counter
    print(f"kernels --decode {a.decode}: fused decode at {threads} thread(s), {a.gen} tokens after a 32-token prompt, median "
          f"step of {a.rounds} rounds; builds: {', '.join(natives)}\n")
    print("| variant | " + " | ".join(f"{k} tok/s" for k in natives) + (" | speed-up | same tokens |"
                                                                           if len(natives) > 1 else " |"))
    print("|---|" + "---|" * len(natives) + ("---|---|" if len(natives) > 1 else ""))
    try:
        for name in a.variants:
            lm = copy.deepcopy(base_lm)
            if RECIPES[name]:
                lmpress.compress(lm, RECIPES[name])
            runners = {}
            for k, nat in natives.items():
                kernels._native = nat
                runners[k] = NativeRunner(lm, max_len=ids.shape[1] + a.gen + 1)
            steps = {k: [] for k in natives}
            toks = {}
            with torch.inference_mode():
                for r in range(a.rounds + 1):  # round 0 warms up
                    for k, run in runners.items():
                        kernels._native = natives[k]
                        tok = int(run.prefill(ids).argmax(-1))
                        out, P = [tok], ids.shape[1]
                        for i in range(a.gen):
                            t = clock()
                            tok = int(run.decode(torch.tensor([tok]), P + i).argmax(-1))
                            if r:
                                steps[k].append(clock() - t)
                            out.append(tok)
                        toks[k] = out
                    assert all(run._plan for run in runners.values()), "a runner did not take the fused step"
            rates = {k: 1 / statistics.median(v) for k, v in steps.items()}
            cells = " | ".join(f"{v:.1f}" for v in rates.values())
            if len(natives) > 1:
                cells += f" | {rates['this'] / rates['base']:.2f}× | {toks['this'] == toks['base']}"
            print(f"| {name} | {cells} |", flush=True)
    finally:
        kernels._native = mine


def main_profile(a) -> None:
    """--decode --profile: where the fused step's time goes, per phase (kernels.decode_profile), at each --threads
    count, rounds alternating between the counts; µs per token (medians over rounds) and the speed-up of each
    phase from the first count to the others. "python" is the time outside the native step (argmax, the runner)."""
    import lmpress
    from lmpress.runtime import NativeRunner
    from runtime import RECIPES  # benchmarks/runtime.py, beside this file

    torch.set_num_threads(1)
    base_lm = lmpress.load(a.decode)
    ids = torch.randint(3, min(1000, base_lm.config.vocab_size), (1, 32), generator=torch.Generator().manual_seed(0))
    names = (*kernels.DECODE_PHASES, "python", "total")
    for name in a.variants:
        lm = copy.deepcopy(base_lm)
        if RECIPES[name]:
            lmpress.compress(lm, RECIPES[name])
        run = NativeRunner(lm, max_len=ids.shape[1] + a.gen + 1)
        if not run._build_plan():
            raise SystemExit(f"{name}: the fused decode step does not take this model ({run.fused_reason})")
        per = {t: {k: [] for k in names} for t in a.threads}
        with torch.inference_mode():
            for r in range(a.rounds + 1):  # round 0 warms up
                for t in a.threads:
                    kernels.set_num_threads(t)
                    tok = int(run.prefill(ids).argmax(-1))
                    kernels.decode_profile(run._plan[0], True)
                    t0 = time.perf_counter()
                    for i in range(a.gen):
                        tok = int(run.decode(torch.tensor([tok]), ids.shape[1] + i).argmax(-1))
                    wall = time.perf_counter() - t0
                    prof = kernels.decode_profile(run._plan[0], False)
                    if r:
                        prof["python"] = wall - sum(prof.values())
                        prof["total"] = wall
                        for k, v in prof.items():
                            per[t][k].append(v / a.gen * 1e6)
        med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in per.items()}
        t0 = a.threads[0]
        print(f"\n{name}: µs per token by phase ({a.gen} tokens after a 32-token prompt, medians of {a.rounds} "
              f"rounds); tok/s " + ", ".join(f"{1e6 / med[t]['total']:.1f} at {t} thread(s)" for t in a.threads))
        print("| phase | " + " | ".join(f"{t} thr µs" for t in a.threads) + " | "
              + " | ".join(f"×{t}" for t in a.threads[1:]) + " |")
        print("|---|" + "---|" * (2 * len(a.threads) - 1))
        for k in names:
            sp = " | ".join(f"{med[t0][k] / med[t][k]:.2f}" if med[t][k] > 0 else "-" for t in a.threads[1:])
            print(f"| {k} | " + " | ".join(f"{med[t][k]:.0f}" for t in a.threads) + f" | {sp} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=1, help="activation rows per call (1 = decode)")
    p.add_argument("--mb", type=int, default=64, help="MB of weights each variant cycles over")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted({*SHAPES, *GEMV_SHAPES}))
    p.add_argument("--gemv", action="store_true", help="the native GEMV alone on every decode shape (see above)")
    p.add_argument("--baseline", help="--gemv: another build's _native*.so, run interleaved with this one")
    p.add_argument("--formats", nargs="+", default=list(GEMV_FORMATS), choices=GEMV_FORMATS, help="--gemv formats")
    p.add_argument("--only", nargs="+", default=None, help="--gemv: only these shapes, as IN:OUT (e.g. 576:1536)")
    p.add_argument("--decode", metavar="MODEL", help="fused decode tok/s of MODEL's variants (see above)")
    p.add_argument("--variants", type=lambda v: v.split(","), default=["w8", "w4g128", "w4g32+h8"])
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="--decode: µs per token by phase of the fused step")
    a = p.parse_args(argv)
    if a.decode and a.profile:
        return main_profile(a)
    if a.decode:
        return main_decode(a)
    if a.gemv:
        a.shapes = a.shapes or list(GEMV_SHAPES)
        return main_gemv(a)
    a.shapes = a.shapes or list(SHAPES)
    bw = copy_bandwidth()
    print(f"kernels: isa={kernels.isa()}; copy bandwidth {bw:.1f} GB/s; rows={a.rows}; median of {a.rounds} rounds\n")
    print("| shape in→out | threads | variant | µs/call | weight GB/s | of copy bw | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for threads in a.threads:
        for key in a.shapes:
            for in_f, out_f in SHAPES[key]:
                for r in bench_shape(in_f, out_f, threads, a.rounds, a.rows, a.mb):
                    print(f"| {r['shape']} | {threads} | {r['variant']} | {r['us']:.1f} | {r['gbs']:.1f} | "
                          f"{r['gbs'] / bw:.0%} | {r['speedup']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
