"""Evaluation: perplexity, KL divergence to a base model, zero-shot accuracy, and speed/size benchmarks."""

from __future__ import annotations

from .report import progress_bar  # noqa: F401  (re-exported for the evaluators)


def evaluate(lm, *, base=None, data: str = "auto", data_dir=None, ctx: int = 512, protocol: str = "llamacpp",
             stride: int | None = None, windows: int | None = None, tasks: list[str] | None = None,
             limit: int | None = None, perplexity: bool = True, batch_tokens: int = 2048,
             progress: bool = False, bos: str = "always") -> dict:
    """Everything `lmpress eval` reports, as one flat-ish dict.

    data "auto" is WikiText-2 when a local copy is found (--data-dir or $LMPRESS_DATA), else the built-in corpus.
    Keys: model, data, and those of perplexity() — or of kl_divergence() when `base` is given — plus "tasks"
    and the averages of zero_shot() when `tasks` is given."""
    from ..data import load_text, wikitext_available
    from .kld import kl_divergence
    from .perplexity import perplexity as ppl
    from .tasks import zero_shot

    out: dict = {"model": lm.source}
    if perplexity:
        if data == "auto":
            data = "wikitext2" if wikitext_available(data_dir) else "builtin"
        text = load_text(data, data_dir)
        out["data"] = data
        kw = dict(ctx=ctx, protocol=protocol, stride=stride, windows=windows, batch_tokens=batch_tokens,
                  progress=progress, bos=bos)
        if base is not None:
            out["base"] = base.source
            out.update(kl_divergence(lm, base, text, **kw))
        else:
            out.update(ppl(lm, text, **kw))
    if tasks:
        out.update(zero_shot(lm, tasks, limit=limit, data_dir=data_dir, progress=progress))
    return out
