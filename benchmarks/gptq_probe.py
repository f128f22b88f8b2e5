"""GPTQ probe: KLD to the base on a few WikiText-2 windows for RTN, HQQ and GPTQ at w4 g128, GPTQ either through
the sequential engine ("gptq") or in one pass with every layer's Hessian taken on the float model ("gptq1"),
optionally on a subset of layers and with a chosen attention-sink weight. The figures of
benchmarks/calibrated.md ("Why GPTQ lost, and the fix") come from it:

    LMPRESS_DATA=../shared/data python benchmarks/gptq_probe.py MODEL --variants rtn,hqq,gptq1,gptq --sink-weight 1
    python benchmarks/gptq_probe.py MODEL --variants gptq1,gptq --sink-weight 64
    python benchmarks/gptq_probe.py MODEL --variants rtn,gptq1 --only 'layers\\.(15|5)\\..*v_proj' --sink-weight 1

Calibration: self:32x512 (seed 0), cached in --cache. Windows: BOS + 511 text tokens, the last 256 predictions
scored (the llama.cpp protocol), 1 thread."""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from lmpress import models, recipe as R
from lmpress.compress import calibration, compress, select
from lmpress.data import load_text, tokenize
from lmpress.quant import gptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="rtn,hqq,gptq1,gptq")
    ap.add_argument("--only", help="regex: quantize only these layers")
    ap.add_argument("--sink-weight", type=float, default=64.0)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", default="self:32x512")
    ap.add_argument("--cache", default=".gptq-probe-calib.pt", help="calibration tokens are kept here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = models.load(args.model)
    if os.path.exists(args.cache):
        calib = torch.load(args.cache, weights_only=True)
    else:
        calib = calibration(lm, args.calib, batch_size=8)
        torch.save(calib, args.cache)
    ids = tokenize(lm.tokenizer, load_text("wikitext2"))
    ev = torch.stack([torch.cat([torch.tensor([lm.bos_id]), torch.as_tensor(ids[i * 511:(i + 1) * 511])])
                      for i in range(args.windows)])  # [W, 512]

    @torch.inference_mode()
    def logp(model):
        return torch.cat([F.log_softmax(model(ev[i:i + 4]).logits[:, 256:].float(), -1)
                          for i in range(0, len(ev), 4)])

    base = logp(lm.model)
    del lm
    for v in args.variants.split(","):
        m = models.load(args.model)
        if v == "rtn":
            compress(m, [R.RTN(bits=4, group_size=128, targets=args.only)])
        elif v == "hqq":
            compress(m, [R.HQQ(bits=4, group_size=128, targets=args.only)])
        elif v == "gptq":
            compress(m, [R.GPTQ(bits=4, group_size=128, targets=args.only, sink_weight=args.sink_weight)],
                     data=calib)
        elif v == "gptq1":  # one pass: every layer's Hessian from the float model's activations
            step = R.GPTQ(bits=4, group_size=128, targets=args.only, sink_weight=args.sink_weight)
            layers = select(m.model, step)
            stats = {n: gptq.init_stats(mod) for n, mod in layers.items()}
            hooks = [mod.register_forward_hook(lambda _m, a, _o, n=n: gptq.update_stats(stats[n], a[0]) and None)
                     for n, mod in layers.items()]
            with torch.no_grad():
                for x in calib:
                    m.model(x)
            for h in hooks:
                h.remove()
            for n, mod in layers.items():
                parent, _, leaf = n.rpartition(".")
                setattr(m.model.get_submodule(parent), leaf, gptq.apply(mod, stats.pop(n), step))
        else:
            raise SystemExit(f"unknown variant {v}")
        lp = logp(m.model)
        print(f"{v}\tKLD {float((base.exp() * (base - lp)).sum(-1).mean()):.4f}", flush=True)


if __name__ == "__main__":
    main()
