"""Text sources and the token windows cut from them for evaluation and calibration.

Sources (`load_text(spec)`):
  wikitext2      WikiText-2 raw test split: `wiki.test.raw` from --data-dir, $LMPRESS_DATA, or (online, with the
                 `datasets` package) the hub, whose rows are joined with "\\n\\n" as transformers' docs do
  builtin        CPython's own documentation topics (`pydoc_data.topics`), shipped with every Python: needs
                 nothing but the install
  PATH.jsonl     one JSON object per line; the `text` field (or PATH.jsonl:FIELD) joined with "\\n\\n"
  PATH           any other file: read as UTF-8 text

Windows: evaluation windows are cut in order from the start of the text; calibration windows are drawn
from a seed, and never overlap a span reserved for evaluation.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput

WIKITEXT_FILE = "wiki.test.raw"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    for cand in (explicit, os.environ.get("LMPRESS_DATA")):
        if cand:
            return Path(cand)
    return None


def _wikitext_file(root: Path | None) -> Path | None:
    if root is not None:
        for cand in (root / "wikitext-2-raw-v1" / WIKITEXT_FILE, root / WIKITEXT_FILE):
            if cand.exists():
                return cand
    return None


def wikitext_available(explicit: str | os.PathLike | None = None) -> bool:
    """Whether a local copy of WikiText-2 is found (no network)."""
    return _wikitext_file(data_dir(explicit)) is not None


def _wikitext(root: Path | None) -> str:
    local = _wikitext_file(root)
    if local is not None:
        return local.read_text(encoding="utf-8")
    try:
        import datasets  # optional, online users only
    except ImportError:
        raise BadInput("WikiText-2 not found: pass --data-dir DIR (holding wikitext-2-raw-v1/wiki.test.raw) or set "
                       "LMPRESS_DATA, or install `datasets` to fetch it online; `--data builtin` needs nothing") from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:  # network or hub failure
        raise BadInput(f"WikiText-2 not found locally and the download failed ({str(e).splitlines()[0][:100]}); "
                       f"pass --data-dir DIR or set LMPRESS_DATA") from None
    return "\n\n".join(rows)


def builtin_text() -> str:
    """CPython's documentation topics: about 0.5 MB of English technical prose, identical for a Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def load_text(spec: str = "wikitext2", data_dir_arg: str | os.PathLike | None = None) -> str:
    if spec == "wikitext2":
        text = _wikitext(data_dir(data_dir_arg))
    elif spec == "builtin":
        text = builtin_text()
    else:
        path, _, field = spec.partition(".jsonl:")
        path = Path(path + ".jsonl") if field else Path(spec)
        if not path.exists():
            raise BadInput(f"no such text source: {spec} (use wikitext2, builtin, a text file or a .jsonl file)")
        if path.suffix == ".jsonl":
            text = _jsonl_text(path, field or "text")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise BadInput(f"the text from '{spec}' is empty: nothing to evaluate or calibrate on")
    return text


def _jsonl_text(path: Path, field: str) -> str:
    parts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInput(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise BadInput(f"{path}:{n}: no string field '{field}' (name another with {path}:FIELD)")
            parts.append(row[field])
    return "\n\n".join(parts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of `text` as token ids, without special tokens. [N] int64"""
    saved = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)  # silence the "longer than the model" warning: we cut windows ourselves
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Window:
    """Token ids fed to the model; the targets are ids[first_target:], each predicted from the position before.

    span is the [start, end) range of the source's token ids the window covers (a prepended BOS not counted)."""

    ids: torch.Tensor  # [T] int64
    first_target: int
    span: tuple[int, int]

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.first_target


def llamacpp_windows(ids: torch.Tensor, ctx: int, bos: int | None, limit: int | None = None) -> list[Window]:
    """llama.cpp's perplexity protocol: non-overlapping windows of ctx tokens, the second half scored.

    Window i is BOS followed by ids[i*ctx : (i+1)*ctx - 1] (ctx tokens in all); its last ctx/2 - 1 predictions
    are scored (255 for ctx 512), as llama.cpp's perplexity tool and shared/scripts/llamacpp-anchor.py do.
    Without a BOS token the window is ids[i*ctx : (i+1)*ctx]."""
    if ctx < 4:
        raise BadInput(f"--ctx {ctx} is too small (at least 4)")
    n = len(ids) // ctx
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise BadInput(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    out = []
    for i in range(n):
        start = i * ctx
        if bos is None:
            w, end = ids[start:start + ctx], start + ctx
        else:
            w, end = torch.cat([torch.tensor([bos]), ids[start:start + ctx - 1]]), start + ctx - 1
        out.append(Window(w, ctx // 2 + 1, (start, end)))
    return out


def stride_windows(ids: torch.Tensor, ctx: int, stride: int, limit: int | None = None) -> list[Window]:
    """The sliding-window protocol of transformers' perplexity guide: windows of ctx tokens moved by `stride`;
    each scores only the tokens no earlier window scored. With stride < ctx every token but the first is
    predicted exactly once, with at least ctx - stride tokens of context after the first window; with
    stride == ctx the first token of each window has no context and is not scored."""
    if not 0 < stride <= ctx:
        raise BadInput(f"--stride must be in 1..ctx ({ctx}), got {stride}")
    if len(ids) < 2:
        raise BadInput("the text has fewer than 2 tokens: nothing to score")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + ctx, len(ids))
        n_new = end - prev_end  # tokens not yet scored
        first = max(1, (end - begin) - n_new)
        out.append(Window(ids[begin:end], first, (begin, end)))
        prev_end = end
        if end == len(ids) or (limit is not None and len(out) >= limit):
            return out
        begin += stride


def calibration_windows(ids: torch.Tensor, n: int, length: int, seed: int = 0,
                        reserved: list[tuple[int, int]] = ()) -> list[Window]:
    """n windows of `length` tokens at seeded random places that overlap neither each other nor `reserved`."""
    free, pos = [], 0
    for a, b in sorted(reserved) + [(len(ids), len(ids))]:
        if a - pos >= length:
            free.append((pos, a))
        pos = max(pos, b)
    slots = [(a + k * length) for a, b in free for k in range((b - a) // length)]
    if len(slots) < n:
        raise BadInput(f"the calibration text has room for {len(slots)} windows of {length} tokens outside the "
                       f"evaluation windows, {n} asked: use fewer or shorter samples or another text")
    rng = random.Random(seed)
    picks = sorted(rng.sample(slots, n))
    return [Window(ids[s:s + length], 1, (s, s + length)) for s in picks]
