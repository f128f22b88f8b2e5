"""llama.cpp's perplexity on a whole text, with the protocol lmpress's `--protocol llamacpp` implements:
windows of CTX tokens, each BOS followed by the next CTX-1 text tokens, the last CTX/2-1 predictions scored
(as ../shared/scripts/llamacpp-anchor.py, but streaming, so the whole WikiText-2 test fits in memory).

Needs the optional peer: pip install llama-cpp-python==0.3.36 (builds llama.cpp from source).
usage: python benchmarks/llamacpp_ppl.py MODEL.gguf [--text FILE] [--ctx 512] [--chunks N] [--threads 2]
           [--bos always|auto|never]
--bos: always (default) opens every window with BOS, as the issue's protocol and llamacpp-anchor.py; auto does
what llama.cpp's llama-perplexity does — BOS only when the GGUF's tokenizer.ggml.add_bos_token is true (false
for SmolLM2 and Qwen2.5), the window otherwise ctx raw text tokens; never: no BOS. `lmpress eval --bos` takes
the same values.
Prints one JSON line: model, ctx, chunks, tokens scored, text tokens (llama.cpp's tokenizer), ppl, seconds."""
import argparse
import json
import math
import os
import time

import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--text", default=os.path.join(os.environ.get("LMPRESS_DATA", "../shared/data"),
                                               "wikitext-2-raw-v1", "wiki.test.raw"))
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--chunks", type=int, default=0, help="0 = every full window")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--bos", choices=["always", "auto", "never"], default="always")
a = ap.parse_args()

llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_threads=a.threads, n_threads_batch=a.threads,
            logits_all=True, verbose=False)
bos = a.bos == "always" or (a.bos == "auto" and llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
toks = llm.tokenize(open(a.text, encoding="utf-8").read().encode("utf-8"), add_bos=False)
n, half = a.ctx, a.ctx // 2
count = len(toks) // n if a.chunks == 0 else min(a.chunks, len(toks) // n)
nll, scored, t0 = 0.0, 0, time.perf_counter()
for i in range(count):
    chunk = [llm.token_bos()] + toks[i * n:(i + 1) * n - 1] if bos else toks[i * n:(i + 1) * n]
    llm.reset()
    llm.eval(chunk)
    x = np.asarray(llm.scores[half:n - 1], dtype=np.float64)  # logits predicting chunk[half+1:]
    x -= x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    tgt = np.array(chunk[half + 1:])
    nll -= float((x[np.arange(len(tgt)), tgt] - lse).sum())
    scored += len(tgt)
print(json.dumps({"model": os.path.basename(a.model), "ctx": n, "chunks": count, "tokens": scored,
                  "text_tokens": len(toks), "ppl": round(math.exp(nll / scored), 4),
                  "seconds": round(time.perf_counter() - t0, 1), "threads": a.threads}), flush=True)
