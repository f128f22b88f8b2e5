"""Where a streamed calibrated compression's memory goes: VmRSS and VmHWM (the process's high-water mark) after
the streamed load, after calibration, after the capture of block 0's inputs, and at the start and end of each
block, for the first N blocks only (the rest of the model is never read); per block also its peak VmRSS
(sampled every 20 ms) and glibc's heap account at that moment (mallinfo2: heap in use / free, mapped).

usage: python benchmarks/stream_memory.py MODEL.gguf [--blocks 2] [--recipe gptq-w4g128] [--calib builtin:128x512]
       [--threads 1] [--slice-tokens 1024] [--glibc-default]
(calibrated.md, "GPTQ with --stream": 2,234 MiB after the load of Qwen2.5-0.5B, high-water 3,769 MiB in block 0.)
"""
import argparse
import ctypes
import threading
import time

import torch

import lmpress.calibrate as C
from lmpress.compress import calibration, compress
from lmpress.memory import _glibc_function
from lmpress.models.stream import load_streaming


def status_kb() -> dict:
    """/proc/self/status's memory lines in kB ({"VmRSS": …, "VmHWM": …})."""
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(d[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def mem() -> str:
    d = status_kb()
    return f"RSS {d['VmRSS'] / 1024:,.0f} MiB, high-water {d['VmHWM'] / 1024:,.0f} MiB"


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap() -> str:
    """glibc's account (mallinfo2, all arenas): heap bytes taken from the OS, in use, free inside the heap
    (resident unless trimmed), and bytes in separate mappings."""
    f = _glibc_function("mallinfo2")
    if f is None:
        return "no glibc account"
    f.restype = MallInfo2
    m = f()
    return (f"heap {m.arena / 2**20:,.0f} MiB (in use {m.uordblks / 2**20:,.0f}, free {m.fordblks / 2**20:,.0f}), "
            f"mapped {m.hblkhd / 2**20:,.0f} MiB in {m.hblks}")


class Sampler(threading.Thread):
    """VmRSS every 20 ms; at each new maximum since reset(), glibc's account then (`heap`)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.at_peak = 0, ""

    def reset(self):
        self.peak, self.at_peak = 0, ""

    def run(self):
        while True:
            rss = status_kb()["VmRSS"]
            if rss > self.peak:
                self.peak, self.at_peak = rss, heap()
            time.sleep(0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--recipe", default="gptq-w4g128")
    ap.add_argument("--calib", default="builtin:128x512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slice-tokens", type=int, default=1024, help="the engine's slice_tokens (0: whole batches)")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold as it is")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.glibc_default:
        C.map_large_allocations = lambda *args, **kw: False
    lm = load_streaming(a.model)
    print("streamed load:", mem(), flush=True)
    data = calibration(lm, a.calib)
    print("calibration tokens:", mem(), flush=True)
    spec_type, run, capture, block = type(lm.arch), C.run_sequential, C.capture_block_inputs, C._compress_block
    all_blocks = spec_type.block_list

    def first_blocks(*args, **kw):  # the engine sees only the first N blocks
        spec_type.block_list = lambda self, m: all_blocks(self, m)[:a.blocks]
        try:
            return run(*args, **kw, slice_tokens=a.slice_tokens or None)
        finally:
            spec_type.block_list = all_blocks

    def captured(*args, **kw):
        out = capture(*args, **kw)
        print("block 0 inputs captured:", mem(), flush=True)
        return out

    sampler = Sampler()
    sampler.start()

    def one_block(*args, **kw):
        print(f"block {args[1]} start:", mem(), flush=True)
        sampler.reset()
        out = block(*args, **kw)
        print(f"block {args[1]} end:  ", mem(), flush=True)
        print(f"  block {args[1]}'s peak VmRSS {sampler.peak / 1024:,.0f} MiB; then {sampler.at_peak}", flush=True)
        return out

    C.run_sequential, C.capture_block_inputs, C._compress_block = first_blocks, captured, one_block
    t0 = time.perf_counter()
    compress(lm, a.recipe, data=data)
    print(f"after {a.blocks} blocks ({time.perf_counter() - t0:.0f} s):", mem())


if __name__ == "__main__":
    main()
