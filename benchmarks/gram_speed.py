"""The statistics' xᵀx (quant.gptq.add_gram) against one whole product added in row slices (the code before
session 11), on Qwen2.5-0.5B's down_proj shape: one slice of 1,024 tokens × 4,864 inputs, float64 sums.
Prints the median of 5 of each, their ratio, and the largest relative difference of the results.

usage: python benchmarks/gram_speed.py [--threads 1] [--tokens 1024] [--inputs 4864]
(calibrated.md, session 11: 1.8 → 0.8 s at one thread, the same values.)
"""
import argparse
import statistics
import time

import torch

from lmpress.quant.gptq import add_gram


def one_product(H, x):
    """add_gram's small-layer path (rows > I/4): one whole product, added in row slices — the code before."""
    add_gram(H, x, rows=H.shape[0] // 4 + 1)


def median_s(f, H, x, reps=5):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(H, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--inputs", type=int, default=4864)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.inputs)
    H = torch.zeros(a.inputs, a.inputs, dtype=torch.float64)
    median_s(one_product, H, x, 1)  # warm-up
    whole, blocks = median_s(one_product, H, x), median_s(add_gram, H, x)
    H1, H2 = torch.zeros_like(H), torch.zeros_like(H)
    one_product(H1, x)
    add_gram(H2, x)
    diff = float((H1 - H2).abs().max() / H1.abs().max())
    print(f"x [{a.tokens}, {a.inputs}], {a.threads} thread(s): one product {whole:.3f} s, add_gram {blocks:.3f} s "
          f"({whole / blocks:.2f}x); max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
