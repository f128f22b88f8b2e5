"""Choosing the next token, and turning token ids back into text as they come.

SamplingParams   what a request asks for (greedy when temperature is 0; seed makes sampling reproducible)
pick_token       logits [V] → one token id: repetition penalty, then temperature, top-k, top-p (HF's order)
distribution     the probabilities pick_token samples from (speculative sampling compares two of them)
TextStream       incremental detokenization with stop strings: pieces of new text, never a stop string,
                 never half a UTF-8 character
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BadInput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; CTRL-style over prompt and output tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them; they are not in the text
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
                  ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0")]
        for name, ok, what in checks:
            if not ok:
                raise BadInput(f"{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide the positive logits of seen tokens by the penalty, multiply the negative ones (as transformers)."""
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest of logits [V] (or [1, V]); ties and NaN as torch.argmax (the first). A float32 row
    on the CPU goes through numpy: torch's argmax over a 49k vocabulary costs ~200 µs there, numpy's ~12 µs, as
    much as a decode step's whole Python overhead."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return int(logits.detach().reshape(-1).numpy().argmax())
    return int(logits.reshape(-1).argmax())


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
               seen: torch.Tensor | None = None) -> int:
    """logits [V] (float32) → a token id."""
    if params.greedy:
        return greedy_token(_penalized(logits, params, seen))
    return int(torch.multinomial(distribution(logits, params, seen), 1, generator=generator))


def _penalized(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        return penalize(logits, seen, params.repetition_penalty)
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities [V] sampling draws from (not for greedy params): penalty, temperature, top-k, top-p."""
    logits = _penalized(logits, params, seen) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sp, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (sp.cumsum(0) - sp) >= params.top_p
        sp[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sp / sp.sum())
    return probs


@dataclass
class TextStream:
    """Incremental detokenization of one sequence's output, with stop strings.

    `push(token)` returns the text that became final (possibly ""); `finished` turns true when a stop
    string appeared (its text, and whatever followed, is dropped). Pieces are decoded from a window that
    starts a few tokens back, so tokenizers that drop a leading space on the first token, or that need
    several tokens for one character, still give the right text.
    """

    tokenizer: object
    prompt_ids: list[int]
    stop: tuple[str, ...] = ()
    text: str = ""  # all final text so far (what was returned by push, plus held-back text after flush)
    finished: bool = False
    _ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # window start in _ids
    _read: int = 0  # tokens already turned into text
    _pending: str = ""  # decoded but held back: it may be the start of a stop string

    def __post_init__(self):
        self._ids = list(self.prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        if self.finished:
            return ""
        self._ids.append(int(token))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character
        self._pending += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def _release(self) -> str:
        if not self.stop:
            out, self._pending = self._pending, ""
            self.text += out
            return out
        # held-back text never ends in a stop string's start, so a stop can only begin in _pending
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = self._pending[:min(hits)]
            self._pending, self.finished = "", True
            self.text += out
            return out
        # hold back the longest end of the buffer that could begin a stop string
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:n]):
                    hold = n
                    break
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation (EOS, length): release held-back text that turned out not to be a stop."""
        out, self._pending = ("" if self.finished else self._pending), ""
        self.text += out
        return out
