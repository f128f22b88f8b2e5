"""Where a streamed calibrated compression's memory goes: VmRSS and VmHWM (the process's high-water mark) after
the streamed load, after calibration, after the capture of block 0's inputs, and at the start and end of each
block, for the first N blocks only (the rest of the model is never read).

usage: python benchmarks/stream_memory.py MODEL.gguf [--blocks 2] [--recipe gptq-w4g128] [--calib builtin:128x512]
       [--threads 1] [--slice-tokens 1024] [--glibc-default]
(calibrated.md, "GPTQ with --stream": 2,234 MiB after the load of Qwen2.5-0.5B, high-water 3,769 MiB in block 0.)
"""
import argparse
import time

import torch

import lmpress.calibrate as C
from lmpress.compress import calibration, compress
from lmpress.models.stream import load_streaming


def mem() -> str:
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return f"RSS {int(d['VmRSS'].split()[0]) / 1024:,.0f} MiB, high-water {int(d['VmHWM'].split()[0]) / 1024:,.0f} MiB"


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

    def one_block(*args, **kw):
        print(f"block {args[1]} start:", mem(), flush=True)
        out = block(*args, **kw)
        print(f"block {args[1]} end:  ", mem(), flush=True)
        return out

    C.run_sequential, C.capture_block_inputs, C._compress_block = first_blocks, captured, one_block
    t0 = time.perf_counter()
    compress(lm, a.recipe, data=data)
    print(f"after {a.blocks} blocks ({time.perf_counter() - t0:.0f} s):", mem())


if __name__ == "__main__":
    main()
