"""Passes of a few rows (speculative verification, batched decode) against one-row decode steps.

    python benchmarks/few_rows.py --gemm [--shape 8960 1536] [--rows 1 5]         kernels.linear_float vs F.linear
    python benchmarks/few_rows.py --verify MODEL [--threads 1 2] [--k 4]           a (k+1)-token pass vs one decode step

--gemm: y = x·Wᵀ for x of each --rows count on a float32 weight of --shape (out, in), 1 thread, cycling over 4 copies
of the weight so that none is in cache; median ms of 8 calls after 4 warm-ups, and the weight bytes per second.
--verify: NativeRunner on MODEL (float32), a 64-token prompt, then per round one decode step and one prefill of
k+1 tokens continuing the cache with all logits (what speculative_generate's verification runs); medians of 4
rounds per thread count, the ratio of the two, and the time spent in kernels.linear_float inside the pass.
"""

import argparse
import statistics
import time

import torch

import lmpress
from lmpress import kernels


def gemm(shape, rows_list) -> None:
    torch.set_num_threads(1)
    O, I = shape
    ws = [torch.randn(O, I) for _ in range(4)]
    print(f"| rows | lmpress linear_float ms | GB/s | torch F.linear ms | GB/s |  ({O}×{I} float32, 1 thread)\n"
          "|---|---|---|---|---|")
    for m in rows_list:
        x = torch.randn(m, I)

        def med(f):
            ts = []
            for r in range(12):
                t = time.perf_counter()
                f(x, ws[r % 4])
                ts.append(time.perf_counter() - t)
            return statistics.median(ts[4:])
        a = med(lambda x, w: kernels.linear_float(x, w, None, threads=1))
        b = med(lambda x, w: torch.nn.functional.linear(x, w))
        print(f"| {m} | {a * 1e3:.2f} | {O * I * 4 / a / 1e9:.1f} | {b * 1e3:.2f} | {O * I * 4 / b / 1e9:.1f} |")


def verify(model: str, threads, k: int) -> None:
    from lmpress.runtime import NativeRunner
    import lmpress.runtime.model as rm

    lm = lmpress.load(model)
    run = NativeRunner(lm, max_len=128)
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    spent = [0.0]
    inner = rm.kernels.linear_float

    def timed(*a, **kw):
        t = time.perf_counter()
        y = inner(*a, **kw)
        spent[0] += time.perf_counter() - t
        return y
    rm.kernels.linear_float = timed
    print(f"| threads | decode step ms | {k + 1}-token pass ms | ratio | linear_float in the pass ms |  ({model})\n"
          "|---|---|---|---|---|")
    try:
        for t in threads:
            torch.set_num_threads(t)
            kernels.set_num_threads(None)
            d, v, lin = [], [], []
            with torch.inference_mode():
                run.prefill(ids)
                for _ in range(5):  # the first round warms up
                    t0 = time.perf_counter()
                    run.decode(torch.tensor([5]), 64)
                    d.append(time.perf_counter() - t0)
                    spent[0] = 0.0
                    t0 = time.perf_counter()
                    run.prefill(torch.tensor([list(range(5, 6 + k))]), start=64, all_logits=True)
                    v.append(time.perf_counter() - t0)
                    lin.append(spent[0])
            dm, vm = statistics.median(d[1:]), statistics.median(v[1:])
            print(f"| {t} | {dm * 1e3:.0f} | {vm * 1e3:.0f} | {vm / dm:.2f} | {statistics.median(lin[1:]) * 1e3:.0f} |",
                  flush=True)
    finally:
        rm.kernels.linear_float = inner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemm", action="store_true")
    ap.add_argument("--shape", type=int, nargs=2, default=[8960, 1536])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8])
    ap.add_argument("--verify", metavar="MODEL")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args(argv)
    if a.gemm:
        gemm(a.shape, a.rows)
    if a.verify:
        verify(a.verify, a.threads, a.k)
    if not (a.gemm or a.verify):
        ap.error("give --gemm and/or --verify MODEL")


if __name__ == "__main__":
    main()
