"""Zero-shot multiple-choice accuracy by log-likelihood, as EleutherAI's lm-evaluation-harness defines it.

Each choice is scored as log P(" " + choice | query): the sum of its tokens' log-probabilities. acc takes the
choice with the highest sum; acc_norm divides each sum by the choice's length in characters first (lm-eval's
`completion_len = [len(c) for c in doc_to_choice(doc)]`: the raw choice, without the " " delimiter).
Two task shapes differ from that:
  winogrande      partial scoring: the same continuation after each of two partial sentences. Every choice
                  shares one continuation, so acc_norm equals acc (lm-eval reports acc only).
  lambada_openai  one continuation per item: acc = it is the greedy argmax at every token; perplexity =
                  exp(-mean over items of its log-likelihood). acc_norm is reported equal to acc.
The standard errors are lm-eval's mean_stderr: sample standard deviation (ddof=1) / sqrt(n).

Data: `<data dir>/zeroshot/<file>.jsonl` (--data-dir or $LMPRESS_DATA); --limit N keeps the first N items.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import data_dir as resolve_data_dir
from ..errors import BadInput
from . import progress_bar
from .scoring import sequence_logprobs

DELIMITER = " "  # lm-eval's target_delimiter, between the query and each choice


@dataclass(frozen=True)
class Item:
    """One question. kind "choice": the answer is the argmax over choices, choice i being
    (contexts[i] or the one shared context, continuations[i] or the one shared continuation).
    kind "greedy": one context and one continuation, right when the continuation is the greedy decoding."""

    contexts: list[str]
    continuations: list[str]
    gold: int = 0
    kind: str = "choice"

    def pairs(self) -> list[tuple[str, str]]:
        n = max(len(self.contexts), len(self.continuations))
        return [(self.contexts[i if len(self.contexts) > 1 else 0],
                 self.continuations[i if len(self.continuations) > 1 else 0]) for i in range(n)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: drop WikiHow's bracketed tags ([title], [step], ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _choice(row: dict) -> Item:
    return Item([row["query"]], [DELIMITER + c for c in row["choices"]], int(row["gold"]))


def _hellaswag(row: dict) -> Item:
    query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return Item([query], [DELIMITER + hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Item:
    return Item(list(row["context_options"]), [DELIMITER + row["continuation"]], int(row["gold"]))


def _lambada(row: dict) -> Item:
    return Item([row["context"]], [DELIMITER + row["continuation"]], 0, kind="greedy")


# task name -> (file under <data dir>/zeroshot/, row -> Item); the order is the order of reports
LOADERS = {
    "arc_easy": ("arc_easy.jsonl", _choice),
    "arc_challenge": ("arc_challenge.jsonl", _choice),
    "piqa": ("piqa.jsonl", _choice),
    "winogrande": ("winogrande.jsonl", _winogrande),
    "hellaswag": ("hellaswag_val_subset1000.jsonl", _hellaswag),
    "lambada_openai": ("lambada_openai.jsonl", _lambada),
    "boolq": ("boolq.jsonl", _choice),
    "openbook_qa": ("openbook_qa.jsonl", _choice),
    "siqa": ("siqa.jsonl", _choice),
    "copa": ("copa.jsonl", _choice),
}
TASKS = tuple(LOADERS)


def load_task(name: str, data_dir=None, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all when None) of task `name` from <data dir>/zeroshot/."""
    if name not in LOADERS:
        raise BadInput(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise BadInput("zero-shot tasks need their data: pass --data-dir DIR (holding zeroshot/*.jsonl) "
                       "or set LMPRESS_DATA")
    fname, make = LOADERS[name]
    path = Path(root) / "zeroshot" / fname
    if not path.exists():
        raise BadInput(f"task '{name}' needs {path}, which does not exist")
    items: list[Item] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                item = make(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise BadInput(f"{path}:{n}: not a valid '{name}' row") from None
            if not 0 <= item.gold < len(item.pairs()):
                raise BadInput(f"{path}:{n}: gold index {item.gold} out of range")
            items.append(item)
    return items


def prefix_bos_id(lm) -> int | None:
    """The token lm-eval puts before the context: BOS when the tokenizer adds one on its own, else None."""
    tok, bos = lm.tokenizer, lm.bos_id
    if bos is None:
        return None
    adds = getattr(tok, "add_bos_token", False) or tok("a")["input_ids"][:1] == [bos]
    return bos if adds else None


def encode_requests(lm, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation), as lm-eval's `_encode_pair`: trailing
    whitespace of the context moves onto the continuation, the continuation's ids are those of
    tok(context + continuation) past tok(context)'s, and the context is cut from the left to fit the model."""
    tok, prefix = lm.tokenizer, prefix_bos_id(lm)
    moved = []
    for ctx, cont in pairs:
        n_space = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[:len(ctx) - n_space], ctx[len(ctx) - n_space:] + cont))
    contexts = sorted({c for c, _ in moved})  # contexts repeat across choices: tokenize each once
    enc = lambda texts: tok(texts, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    ctx_ids = dict(zip(contexts, enc(contexts))) if contexts else {}
    wholes = enc([c + k for c, k in moved])
    empty = lm.bos_id if lm.bos_id is not None else tok.eos_token_id
    max_pos = lm.max_positions
    out = []
    for (ctx, cont), whole in zip(moved, wholes):
        if ctx == "":  # nothing to condition on: start from BOS (EOS when there is none), as lm-eval does
            c_ids, k_ids = [empty], enc([cont])[0]
        else:
            k_ids = whole[len(ctx_ids[ctx]):]
            c_ids = ([prefix] if prefix is not None else []) + ctx_ids[ctx]
        if max_pos is not None and len(c_ids) + len(k_ids) > max_pos + 1:  # the last token is never an input
            k_ids = k_ids[-max_pos:]
            c_ids = c_ids[-(max_pos + 1 - len(k_ids)):]
        out.append((c_ids, k_ids))
    return out


def mean_stderr(xs: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation (ddof=1) / sqrt(n); nan below 2 items."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def choice_correct(lls: list[float], lengths: list[int], gold: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one question: is gold the argmax of lls, of lls / character lengths.
    Ties go to the first index, as numpy's argmax."""
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    best_norm = max(range(len(lls)), key=lambda i: (lls[i] / max(lengths[i], 1), -i))
    return best == gold, best_norm == gold


def evaluate_items(lm, items: list[Item], batch_tokens: int = 4096, progress: bool = False,
                   desc: str = "zero-shot") -> dict:
    """acc, acc_stderr, acc_norm, acc_norm_stderr, n (and perplexity when there are greedy items)."""
    pairs = [p for it in items for p in it.pairs()]
    with progress_bar(len(pairs), desc, progress, unit="req") as bar:
        scores = sequence_logprobs(lm.model, encode_requests(lm, pairs), batch_tokens, bar)  # [(ll, greedy)]
    acc, acc_norm, greedy_lls, k = [], [], [], 0
    for it in items:
        got, k = scores[k:k + len(it.pairs())], k + len(it.pairs())
        if it.kind == "greedy":
            greedy_lls.append(got[0][0])
            right = right_norm = got[0][1]
        else:
            lengths = [len(cont.removeprefix(DELIMITER)) for _, cont in it.pairs()]  # lm-eval: the raw choice
            right, right_norm = choice_correct([ll for ll, _ in got], lengths, it.gold)
        acc.append(float(right))
        acc_norm.append(float(right_norm))
    n = len(items)
    out = {"acc": sum(acc) / n if n else float("nan"), "acc_stderr": mean_stderr(acc),
           "acc_norm": sum(acc_norm) / n if n else float("nan"), "acc_norm_stderr": mean_stderr(acc_norm), "n": n}
    if greedy_lls:
        out["perplexity"] = math.exp(-sum(greedy_lls) / len(greedy_lls))
    return out


def zero_shot(lm, tasks: list[str] | None = None, limit: int | None = None, data_dir=None,
              batch_tokens: int = 4096, progress: bool = False) -> dict:
    """Zero-shot accuracy of `lm` on `tasks` (all of TASKS when None), the first `limit` items of each.
    Returns {"tasks": {name: metrics}, "average_acc", "average_acc_norm", "seconds"}."""
    names = list(TASKS if tasks is None else tasks)
    unknown = [t for t in names if t not in LOADERS]
    if unknown:
        raise BadInput(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                       f"(known: {', '.join(TASKS)})")
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, got {limit}")
    t0 = time.perf_counter()
    data = {name: load_task(name, data_dir, limit) for name in names}  # every file checked before any scoring
    results = {name: evaluate_items(lm, items, batch_tokens, progress, desc=name) for name, items in data.items()}
    mean = lambda key: sum(r[key] for r in results.values()) / len(results) if results else float("nan")  # noqa: E731
    return {"tasks": results, "average_acc": mean("acc"), "average_acc_norm": mean("acc_norm"),
            "seconds": time.perf_counter() - t0}
