"""What the one-row "q8" activation rounding of the fast decode path costs in quality.

    LMPRESS_DATA=../shared/data python benchmarks/q8_quality.py MODEL [--variants w4g128+h8] [--windows 16]

The quality tables evaluate windows of 512 tokens, which PackedLinear computes with float activations; one-row
decoding rounds its activations to int8 per block of 32 columns first (kernels, "q8"). This evaluates each packed
variant twice on the same WikiText-2 windows — as the tables do, then with every packed layer's reference forward
rounding every row's activations as the one-row path does — and prints perplexity, KLD and top-1 to the base.
(Int8WeightLinear layers — the symmetric per-channel int8 of "w8" — are another class and are not covered.)
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

import lmpress
from lmpress.eval import evaluate
from lmpress.nn.packed import PackedLinear

sys.path.insert(0, str(Path(__file__).parent))
from runtime import RECIPES  # noqa: E402  benchmarks/runtime.py, beside this file


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="w4g128+h8")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    base = lmpress.load(a.model)
    print(f"| variant | activations | perplexity | KLD | top-1 |  (WikiText-2, first {a.windows} windows of 512)\n"
          "|---|---|---|---|---|")
    forward, act = PackedLinear.forward, PackedLinear._act
    try:
        for name in a.variants.split(","):
            lm = copy.deepcopy(base)
            lmpress.compress(lm, RECIPES[name])
            for mode in ("f32", "q8"):
                if mode == "q8":  # the reference forward, rounding as the one-row kernels do, for every row count
                    PackedLinear.forward = PackedLinear.forward_reference
                    PackedLinear._act = lambda self, x: "q8" if self.bits in self.native_bits else "f32"
                r = evaluate(lm, base=base, data="wikitext2", ctx=512, windows=a.windows)
                print(f"| {name} | {mode} | {r['perplexity']:.3f} | {r['kld']:.4f} | {r['top1_agreement']:.3f} |",
                      flush=True)
                PackedLinear.forward, PackedLinear._act = forward, act
    finally:
        PackedLinear.forward, PackedLinear._act = forward, act


if __name__ == "__main__":
    main()
