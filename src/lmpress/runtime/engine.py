"""The generation engine: requests in, tokens and text out, one batched forward pass per step.

    engine = Engine(lm, max_batch=4)                 # NativeRunner when the family allows, else transformers
    engine.generate("Once upon a time", SamplingParams(max_tokens=32)).text
    for piece in engine.stream(prompt, params): print(piece, end="")
    engine.generate_batch([p1, p2, p3], params)      # several prompts, batched

Continuous batching (what a server drives, from one worker thread):

    sched = engine.scheduler()
    rid = sched.add_request("Hello", params)         # thread-safe; returns the request id at once
    while sched.has_work():
        for ev in sched.step():                      # every active sequence advances by one token
            ev.request_id, ev.text, ev.finished, ev.completion   # completion set on the final event
    sched.cancel(rid)                                # thread-safe; the request ends with finish_reason "cancelled"
    sched.counts()                                   # {"active", "waiting", "max_batch"}

Each active request owns one row of the runner's KV cache; rows are kept packed at the front (a finished
row is replaced by the last one), so a decode step is one forward pass over rows 0..n-1 with per-row
positions. A step first decodes the running rows, then admits waiting requests into free rows (one prefill
each, which also picks their first token), so every request gets exactly one token per step.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import BadInput
from .model import make_runner
from .sampling import SamplingParams, TextStream, make_generator, pick_token


@dataclass
class Completion:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens (an EOS that ended generation is not included)
    text: str  # their text, without a stop string that ended generation
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens or context), "cancelled"
    prefill_s: float = 0.0  # the prompt's forward pass
    decode_s: float = 0.0  # from the first token to the last
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from the prefill
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.token_ids),
                "token_ids": self.token_ids, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                **self.stats}


@dataclass
class Event:
    request_id: int
    token_id: int | None  # None on a final event that carries no new token
    text: str  # newly final text (may be "")
    finished: bool = False
    completion: Completion | None = None  # on the final event


class Sequence:
    """One request's state: its tokens, text stream, sampler and how much of it the KV cache holds."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, engine: Engine):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.tokens: list[int] = []
        self.text = TextStream(engine.tokenizer, prompt_ids, params.stop)
        self.generator = make_generator(params, "cpu")
        self.eos = set() if params.ignore_eos else set(engine.eos_ids)
        self.eos |= set(params.stop_token_ids)
        self.max_len = engine.max_len
        self.length = 0  # tokens in the KV cache (prompt, then generated ones)
        self.next_token: int | None = None  # sampled, not yet in the cache
        self.finish_reason: str | None = None
        self.prefill_s = 0.0
        self.t_first = self.t_last = 0.0
        self.seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long) if params.repetition_penalty != 1 \
            else None

    def sample(self, logits: torch.Tensor) -> int:
        return pick_token(logits.cpu(), self.params, self.generator, self.seen)  # sampling state lives on the CPU

    def accept(self, token: int) -> Event:
        """Record a sampled token; decide whether the sequence ends here."""
        now = time.perf_counter()
        self.t_first = self.t_first or now
        self.t_last = now
        if token in self.eos:
            return self.finish("stop")
        self.tokens.append(token)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, torch.tensor([token])]).unique()
        piece = self.text.push(token)
        self.next_token = token
        if self.text.finished:
            return self.finish("stop", token, piece)
        if len(self.tokens) >= self.params.max_tokens or self.length >= self.max_len:
            return self.finish("length", token, piece)
        return Event(self.id, token, piece)

    def finish(self, reason: str, token: int | None = None, piece: str = "") -> Event:
        self.finish_reason = reason
        piece += self.text.flush()
        return Event(self.id, token, piece, True, self.completion())

    def completion(self) -> Completion:
        return Completion(self.id, self.prompt_ids, list(self.tokens), self.text.text, self.finish_reason or "",
                          self.prefill_s, self.t_last - self.t_first)


class Scheduler:
    """Continuous batching over one engine's runner. add_request/cancel are thread-safe; call step() from one
    thread only (the one that owns the model)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.runner = engine.runner
        self.max_batch = self.runner.max_batch
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._cancel: set[int] = set()
        self._next_id = 0
        self.active: list[Sequence] = []  # active[i] owns KV row i
        self._logits: torch.Tensor | None = None  # one row's logits, reused by the next decode (runner.decode out)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.engine.check_prompt(ids)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._waiting.append(Sequence(rid, ids, params or SamplingParams(), self.engine))
        return rid

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.active or self._waiting)

    def counts(self) -> dict:
        """{"active", "waiting", "max_batch"}: for a server's health or load reporting."""
        with self._lock:
            return {"active": len(self.active), "waiting": len(self._waiting), "max_batch": self.max_batch}

    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            for s in [s for s in self._waiting if s.id in cancel]:
                self._waiting.remove(s)
                events.append(s.finish("cancelled"))
        cancelled = {i for i, s in enumerate(self.active) if s.id in cancel}
        events += [self.active[i].finish("cancelled") for i in sorted(cancelled)]
        self._drop(cancelled)

        done = set()
        if self.active:
            pos = [s.length for s in self.active]
            ids = torch.tensor([s.next_token for s in self.active], dtype=torch.long)
            logits = self.runner.decode(ids, pos[0] if len(set(pos)) == 1 else pos,
                                        out=self._logits if len(ids) == 1 else None)  # [B, V]
            self._logits = logits if len(ids) == 1 else None  # sampled below, then written again next step
            for i, s in enumerate(self.active):
                s.length += 1
                ev = s.accept(s.sample(logits[i]))
                events.append(ev)
                if ev.finished:
                    done.add(i)
            self._drop(done)

        while len(self.active) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                s = self._waiting.popleft()
            events.append(self._admit(s))
        return events

    def _admit(self, s: Sequence) -> Event:
        row = len(self.active)
        t0 = time.perf_counter()
        logits = self.runner.prefill(torch.tensor([s.prompt_ids]), start=0, row=row)[0]
        s.prefill_s = time.perf_counter() - t0
        s.length = len(s.prompt_ids)
        ev = s.accept(s.sample(logits))
        if not ev.finished:
            self.active.append(s)
        return ev

    def _drop(self, rows: set[int]) -> None:
        """Free finished rows, moving the last active rows into the holes (highest first keeps indices valid)."""
        for r in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if r != last:
                self.runner.move_row(last, r, self.active[last].length)
                self.active[r] = self.active[last]
            self.active.pop()


class Stream:
    """Iterate for text pieces; `.completion` is set once the iteration ends."""

    def __init__(self, events):
        self._events = events
        self.completion: Completion | None = None

    def __iter__(self):
        for ev in self._events:
            if ev.text:
                yield ev.text
            if ev.finished:
                self.completion = ev.completion


class Engine:
    def __init__(self, lm, max_batch: int = 1, max_len: int | None = None, backend: str = "auto"):
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.runner, self.notice = make_runner(lm, max_batch, max_len, backend)
        if self.notice:
            warnings.warn(f"lmpress runtime: {self.notice}", stacklevel=2)
        self.max_len = self.runner.max_len
        self.eos_ids = _eos_ids(lm)

    @property
    def native(self) -> bool:
        return self.runner.native

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation through the tokenizer's chat template (a plain 'role: text' layout
        when it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(t) for t in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise BadInput("the prompt is empty (no tokens)")
        if len(ids) >= self.max_len:
            raise BadInput(f"the prompt has {len(ids)} tokens; the context limit is {self.max_len} "
                           f"(room is needed for at least one new token)")
        bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise BadInput(f"token id {bad[0]} is outside the vocabulary (0..{self.runner.vocab_size - 1})")

    def scheduler(self) -> Scheduler:
        """A scheduler over this engine's KV cache (one at a time: they would share the cache rows)."""
        return Scheduler(self)

    def events(self, prompts: list, params: SamplingParams | None = None):
        sched = self.scheduler()
        for p in prompts:
            sched.add_request(p, params)
        while sched.has_work():
            yield from sched.step()

    def generate_batch(self, prompts: list, params: SamplingParams | None = None) -> list[Completion]:
        """Several prompts (texts or id lists), decoded together max_batch at a time; results in prompt order."""
        done = {ev.request_id: ev.completion for ev in self.events(prompts, params) if ev.finished}
        return [done[i] for i in range(len(prompts))]

    def generate(self, prompt, params: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt], params)[0]

    def stream(self, prompt, params: SamplingParams | None = None) -> Stream:
        return Stream(self.events([prompt], params))


def _eos_ids(lm) -> set[int]:
    ids: set[int] = set()
    for src in (lm.tokenizer, lm.config, getattr(lm.model, "generation_config", None)):
        v = getattr(src, "eos_token_id", None)
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, int):
                ids.add(t)
    return ids


def generate(lm, prompt, max_tokens: int = 128, draft=None, draft_k: int = 4, **sampling) -> Completion:
    """One-call generation: `lmpress.generate(lm, "Once upon a time", max_tokens=32, temperature=0.7)`.
    prompt: text or token ids; draft: a LoadedModel of the same family for speculative decoding; sampling:
    the other SamplingParams fields. Builds an engine sized for this request (use Engine to reuse one)."""
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    n = len(lm.tokenizer(prompt).input_ids) if isinstance(prompt, str) else len(prompt)
    max_len = n + max_tokens + draft_k + 1
    engine = Engine(lm, max_len=max_len)
    if draft is None:
        return engine.generate(prompt, params)
    from .speculative import speculative_generate

    return speculative_generate(engine, Engine(draft, max_len=max_len), prompt, params, draft_k)
