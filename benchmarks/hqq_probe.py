"""HQQ against RTN at low bits: end-to-end KLD of fake-quantized weights, and per-layer errors with real inputs.

Written for the one row where HQQ loses (Qwen2.5-0.5B, w3 g64, benchmarks/quantization.md): is it the
selection rule, the packed path, a layer type, or the text sample?

    LMPRESS_DATA=../shared/data python benchmarks/hqq_probe.py MODEL --bits 3 --group 64 --windows 20 \\
        [--offset 0] [--variants rtn,hqq,hqq-l1,hqq-l2,hqq-official,hqq-kv-rtn,hqq-mean] [--layers]

KLD: every linear layer but the head fake-quantized (float weights set to dequantized codes, so no packed
kernel is involved), WikiText-2 windows of 512 (BOS + 511 tokens, the last 256 scored, from window
--offset), KLD to the float model. Variants: rtn (min-max, integer zero); hqq (lmpress: per group the
iterate with the lowest Σ|e|^0.7); hqq-l1 / hqq-l2 (the same iterates, kept by Σ|e| / Σe²); hqq-official
(the HQQ library's rule: stop when the whole tensor's mean |e| rises); hqq-kv-rtn (hqq, but k_proj and
v_proj by RTN); rtn-frac (min-max with the fractional zero that maps each group's min to code 0 exactly, HQQ's
start); hqq-minmax (hqq started from that fractional zero: `start="minmax"`); hqq-both-l2 /
hqq-both-lp (per group the better of hqq from either start, by Σe² / Σ|e|^0.7); rtn-cover / hqq-cover (an
integer zero with the scale widened so that the grid covers each group's min and max, without / with HQQ's
iterations: `start="cover"`); hqq-kurtT (per layer the minmax start where the weights' kurtosis exceeds T,
e.g. hqq-kurt6); hqq-mean (hqq's codes, each group's zero then moved so that its mean error is 0); hqq-ls
(hqq's codes, each group's scale and zero refit by least squares); hqq-unbias / hqq-unbias-row (hqq's codes
and zeros, the scale divided by α = <ŵ, w>/<w, w> of the group / of the row: no attenuation of w's own
direction). Each KLD row also gives ‖Ŵ‖/‖W‖ averaged over the layers (does the method shrink the weights?).
--layers: per layer type, HQQ's error over RTN's — on the weight, on the layer's output with real inputs
(XᵀX of 4 later windows), on each group's mean (a bias), at each group's largest weight, and on the 1% input
columns of largest norm — instead of the KLD.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from lmpress import models
from lmpress.data import load_text, tokenize
from lmpress.quant.hqq import _shrink, cover_qparams, hqq_qparams
from lmpress.quant.primitives import compute_qparams, dequantize, quantize
from lmpress.quant.rtn import storage_qparams


def hqq_variant(w, bits, group, rule, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """Dequantized weight of HQQ's zero-point iterations kept by `rule` (l1, l2, official)."""
    qp = storage_qparams(compute_qparams(w, bits, group, symmetric=False))
    O, I = w.shape
    wg = w.reshape(O, qp.scale.shape[1], -1)
    s, z = qp.scale[..., None], qp.zero[..., None]
    codes = lambda zero: torch.clamp(torch.round(wg / s + zero), 0, 2**bits - 1)  # noqa: E731
    err = lambda zero: (codes(zero) - zero) * s - wg  # noqa: E731
    norm = {"l1": 1.0, "l2": 2.0}.get(rule)
    best_z = z
    best = err(z).abs().mean() if norm is None else err(z).abs().pow(norm).sum(-1, keepdim=True)
    for _ in range(iters):
        z = (codes(z) - (wg - _shrink(wg - (codes(z) - z) * s, beta, p)) / s).mean(-1, keepdim=True).half().float()
        beta *= kappa
        if norm is None:  # official: one decision for the whole tensor, stop at the first rise
            e = err(z).abs().mean()
            if e >= best:
                break
            best, best_z = e, z
        else:
            e = err(z).abs().pow(norm).sum(-1, keepdim=True)
            better = e < best
            best_z, best = torch.where(better, z, best_z), torch.where(better, e, best)
    return ((codes(best_z) - best_z) * s).reshape(O, I)


KURT_MINMAX: list = []  # hqq-kurtT: per layer, whether it took the minmax start


def _deq(codes, qp, shape):
    c = codes.float().reshape(shape[0], qp.scale.shape[1], -1)
    return ((c - qp.zero[..., None]) * qp.scale[..., None]).reshape(shape)


def fake_quant(w, bits, group, variant, name):
    if variant == "rtn-frac":  # min-max with the zero that maps each group's min to code 0 exactly
        qp = storage_qparams(compute_qparams(w, bits, group, symmetric=False))
        wg = w.reshape(w.shape[0], qp.scale.shape[1], -1)
        s = qp.scale[..., None]
        z = (-wg.amin(-1, keepdim=True) / s).half().float()
        c = torch.clamp(torch.round(wg / s + z), 0, 2**bits - 1)
        return ((c - z) * s).reshape(w.shape)
    if variant.startswith("hqq-kurt"):  # per layer: the minmax start where the weights are heavy-tailed
        k = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
        start = "minmax" if k > float(variant.removeprefix("hqq-kurt")) else "rtn"
        KURT_MINMAX.append(start == "minmax")
        return _deq(*hqq_qparams(w, bits, group, start=start), w.shape)
    if variant == "rtn-cover":  # integer zero, the scale widened so that the grid covers min and max
        wg = w.reshape(w.shape[0], -1, group)
        s, z = cover_qparams(wg, 2**bits - 1)
        return ((torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1) - z) * s).reshape(w.shape)
    if variant in ("hqq-both-l2", "hqq-both-lp"):  # per group, the better of HQQ from each start
        G = w.shape[1] // group
        out = [dequantize(*hqq_qparams(w, bits, group, start=start)).reshape(w.shape[0], G, group)
               for start in ("rtn", "minmax")]
        wg = w.reshape(out[0].shape)
        p = 2.0 if variant.endswith("l2") else 0.7
        e0, e1 = ((o - wg).abs().pow(p).sum(-1, keepdim=True) for o in out)
        return torch.where(e1 < e0, out[1], out[0]).reshape(w.shape)
    if variant == "rtn" or (variant == "hqq-kv-rtn" and ("k_proj" in name or "v_proj" in name)):
        qp = storage_qparams(compute_qparams(w, bits, group, symmetric=False))
        return dequantize(quantize(w, qp), qp)
    if variant in ("hqq", "hqq-kv-rtn", "hqq-mean", "hqq-ls", "hqq-unbias", "hqq-unbias-row", "hqq-minmax",
                   "hqq-cover"):
        start = {"hqq-minmax": "minmax", "hqq-cover": "cover"}.get(variant, "rtn")
        codes, qp = hqq_qparams(w, bits, group, start=start)
        c = codes.float().reshape(w.shape[0], qp.scale.shape[1], -1)
        s, z = qp.scale[..., None], qp.zero[..., None]
        if variant == "hqq-mean":  # same codes, the zero moved so that each group's mean error is 0
            z = (c - w.reshape(c.shape) / s).mean(-1, keepdim=True).half().float()
        if variant == "hqq-ls":  # same codes, scale and zero refit by least squares per group (w ≈ s·(c − z))
            wg = w.reshape(c.shape).float()
            cc, wc = c - c.mean(-1, keepdim=True), wg - wg.mean(-1, keepdim=True)
            var = (cc * cc).sum(-1, keepdim=True)
            s_ls = torch.where(var > 0, (cc * wc).sum(-1, keepdim=True) / var.clamp_min(1e-12), s)
            s = torch.where(s_ls > 0, s_ls, s).half().float()
            z = (c.mean(-1, keepdim=True) - wg.mean(-1, keepdim=True) / s).half().float()
        if variant.startswith("hqq-unbias"):  # same codes and zeros, the scale divided by the attenuation
            wg = w.reshape(c.shape).float()  # α = <ŵ, w> / <w, w> (per group, or per row), so that ŵ's
            wh = (c - z) * s  # component along w is w itself
            dims = (-1,) if variant == "hqq-unbias" else (-2, -1)
            alpha = (wh * wg).sum(dims, keepdim=True) / (wg * wg).sum(dims, keepdim=True).clamp_min(1e-20)
            s = torch.where(alpha > 0.5, s / alpha, s).half().float()
        return ((c - z) * s).reshape(w.shape)
    return hqq_variant(w, bits, group, variant.removeprefix("hqq-"))


def windows(lm, ids, first, n):
    ids = torch.as_tensor(ids)
    return torch.stack([torch.cat([torch.tensor([lm.bos_id]), ids[(first + i) * 511:(first + i + 1) * 511]])
                        for i in range(n)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--variants", default="rtn,hqq")
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = models.load(a.model)
    ids = tokenize(lm.tokenizer, load_text("wikitext2"))
    lins = {n: m for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and n != lm.arch.lm_head}
    orig = {n: m.weight.detach().float().clone() for n, m in lins.items()}
    print(f"hqq_probe {os.path.basename(a.model)}: w{a.bits} g{a.group}", file=sys.stderr)
    if a.layers:
        H = {}

        def hook(name):
            def f(mod, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                H[name] = H.get(name, 0) + x.T @ x
            return f

        hs = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
        with torch.inference_mode():
            lm.model(windows(lm, ids, 100, 4))
        for h in hs:
            h.remove()
        per_type, per_layer = {}, []
        for n, w in orig.items():
            er = w - fake_quant(w, a.bits, a.group, "rtn", n)
            eh = w - fake_quant(w, a.bits, a.group, "hqq", n)
            Hn = H[n].float()
            out = lambda e: float(((e @ Hn) * e).sum())  # noqa: E731  ‖E X‖² summed over the 4 windows
            wg = w.reshape(w.shape[0], -1, a.group)
            at_max = wg.abs().argmax(-1, keepdim=True)
            top = w.norm(dim=0).topk(max(1, w.shape[1] // 100)).indices  # the 1% largest input columns

            def stats(e):
                eg = e.reshape(wg.shape)
                return torch.tensor([float((e**2).sum()), out(e), float((eg.mean(-1)**2).sum()),
                                     float(eg.gather(-1, at_max).abs().sum()), float((e[:, top]**2).sum())])
            per_type.setdefault(n.split(".")[-1], []).append((stats(eh) / stats(er)).tolist())
            per_layer.append((per_type[n.split(".")[-1]][-1][1], n))
        print("| layer type | weight error² | output error² (real inputs) | group-mean error² (bias) | "
              "|error| at each group's largest weight | error² on the 1% largest-norm columns |\n"
              "|---|---|---|---|---|---|")
        for k, v in per_type.items():
            t = torch.tensor(v).mean(0).tolist()
            print(f"| {k} | " + " | ".join(f"{x:.3f}" for x in t) + " |")
        print("\n(each: HQQ's over RTN's, averaged over the layers of that type)")
        print("layers with the highest output-error ratio: " +
              ", ".join(f"{n} {r:.3f}" for r, n in sorted(per_layer, reverse=True)[:8]))
        return
    ev = windows(lm, ids, a.offset, a.windows)

    @torch.inference_mode()
    def logp(i):
        return F.log_softmax(lm.model(ev[i:i + 2]).logits[:, 256:].float(), -1)

    base = [logp(i).half() for i in range(0, a.windows, 2)]  # fp16 keeps the float model's 20 windows in 1.5 GB
    print(f"| variant | KLD (windows {a.offset}–{a.offset + a.windows - 1}) | ‖Ŵ‖/‖W‖ (mean over layers) |\n|---|---|---|")
    for v in a.variants.split(","):
        with torch.no_grad():
            for n, m in lins.items():
                m.weight.copy_(fake_quant(orig[n], a.bits, a.group, v, n))
        gain = sum(float(m.weight.detach().norm() / orig[n].norm()) for n, m in lins.items()) / len(lins)
        tot = 0.0
        for j, i in enumerate(range(0, a.windows, 2)):
            b, lp = base[j].float(), logp(i)
            tot += float((b.exp() * (b - lp)).sum(-1).sum())
        print(f"| {v} | {tot / (a.windows * 256):.4f} | {gain:.5f} |", flush=True)
        if KURT_MINMAX:
            print(f"  ({v}: {sum(KURT_MINMAX)} of {len(KURT_MINMAX)} layers took the minmax start)", flush=True)
            KURT_MINMAX.clear()


if __name__ == "__main__":
    main()
