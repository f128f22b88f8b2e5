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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=1, help="activation rows per call (1 = decode)")
    p.add_argument("--mb", type=int, default=64, help="MB of weights each variant cycles over")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = p.parse_args(argv)
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
