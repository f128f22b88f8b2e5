"""Speed, size and energy of a loaded model: what it costs to keep and to run.

`bench(lm, ...)` returns one flat dict:

  size_bytes               bytes on disk (lm.disk_bytes; 0 for a model only in memory)
  memory_bytes             bytes of the model's unique parameter and buffer storage in memory (a storage
                           shared by several tensors, e.g. tied embeddings, counted once)
  params                   unique parameters (elements of the model's nn.Parameters, tied ones once)
  bits_per_weight          bits stored on disk per weight: disk_bytes * 8 / disk_params. Scales and zeros of a
                           quantized file are in its bytes, so a Q4_1 file is ~5 bits, not 4. None when nothing
                           is on disk.
  memory_bits_per_weight   memory_bytes * 8 / params
  load_s                   seconds lm took to load (lm.load_s)
  peak_rss_bytes           the process's peak resident memory, read after the benchmark (includes everything
                           the process ever held, not just this model)
  prefill_tokens_per_s     batch * prompt_tokens / (time of one forward pass over the prompt batch)
  ttft_s                   time to first token: that prefill plus picking the first token (for the batch)
  decode_tokens_per_s      batch * gen_tokens / (time of gen_tokens greedy KV-cache steps after the prefill):
                           aggregate over the batch
  decode_tokens_per_s_per_seq   the same for one sequence of the batch (gen_tokens / time)
  decode_ms_per_token      milliseconds per decode step (each step gives every sequence one token)
  energy_j_per_token       joules per decoded token (decode phase of the timed runs, all sequences)
  energy_source            "rapl" (package energy counters; they count the whole CPU package, other
                           processes included) or "estimate: cpu-seconds x W/core" (process CPU time during
                           decode x WATTS_PER_CORE)
  watts_per_core           the W/core the estimate used (None with RAPL)
  decode_cpu_s_per_token   process CPU seconds (user + sys, all threads) per decoded token
  engine                   "lmpress" (lmpress's runtime) or "transformers" (the reference path)
  threads, batch, prompt_tokens, gen_tokens, repeats, warmup   what was asked
  machine                  {"cpu": model name, "logical_cores", "torch", "transformers", "torch_threads"}

Timings are medians over `repeats` timed runs after `warmup` untimed ones; each run is a fresh prefill then
gen_tokens decode steps (gen_tokens + 1 tokens come out: the first from the prefill).

The prompt is deterministic: row i of the batch is BOS (when the model has one) followed by ids drawn
uniformly from the vocabulary by a torch.Generator seeded with PROMPT_SEED + i. Random ids, not text, so the
prompt length is exact for any tokenizer; the content does not change the cost of a dense forward pass.

The model stepping lives in `generate_greedy` (transformers' model with its DynamicCache) and
`generate_greedy_runtime` (lmpress's runtime: its NativeRunner, for the families it supports); both share one
timing loop. `engine` says which ran: "lmpress" when the native forward did, else "transformers" (asked for,
or a family without a native forward).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput
from ..runtime.sampling import greedy_token
from . import progress_bar

# A server core under full load draws roughly its share of the package's TDP: an AMD EPYC 7B13 (the cloud
# part these machines report) is 240 W for 64 cores = 3.75 W/core, rounded up to 4 W. It leaves out DRAM and
# idle cores, so it is a rough figure for comparing models on one machine, not a measurement.
# Override with the environment variable LMPRESS_WATTS_PER_CORE.
WATTS_PER_CORE = 4.0
WATTS_ENV = "LMPRESS_WATTS_PER_CORE"
ESTIMATE_LABEL = "estimate: cpu-seconds x W/core"

RAPL_ROOT = Path("/sys/class/powercap")  # package domains: RAPL_ROOT/intel-rapl:N/energy_uj (AMD uses it too)
PROMPT_SEED = 1234


# ---- size -------------------------------------------------------------------------------------------------

def model_storage(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of unique parameter + buffer storage, unique parameter count). Tensors that share memory (tied
    embeddings, views of one storage) are counted once, keyed by their storage's data_ptr."""
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() != 0:  # 0: meta tensors and empty storages hold no memory
            storages[s.data_ptr()] = s.nbytes()
    seen, params = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel(), tuple(p.stride()))
        if key not in seen:
            seen.add(key)
            params += p.numel()
    return sum(storages.values()), params


# ---- energy -----------------------------------------------------------------------------------------------

def rapl_domains(root: Path | None = None) -> list[Path]:
    """Readable RAPL package domains (intel-rapl:N, not the intel-rapl:N:M subdomains, which they contain)."""
    root = RAPL_ROOT if root is None else root
    found = []
    for d in sorted(root.glob("intel-rapl:*")):
        if d.name.count(":") != 1:
            continue
        try:
            int((d / "energy_uj").read_text())
            int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):  # absent, or root-only (kernels >= 5.10 restrict energy_uj)
            continue
        found.append(d)
    return found


def read_rapl(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def rapl_joules(domains: list[Path], before: list[int], after: list[int]) -> float:
    """Energy between two readings, summed over domains; a counter that passed its range wrapped once."""
    uj = 0
    for d, a, b in zip(domains, before, after):
        uj += b - a if b >= a else b + int((d / "max_energy_range_uj").read_text()) - a
    return uj / 1e6


def watts_per_core() -> float:
    raw = os.environ.get(WATTS_ENV)
    if raw is None:
        return WATTS_PER_CORE
    try:
        w = float(raw)
    except ValueError:
        w = -1.0
    if not w > 0:
        raise BadInput(f"{WATTS_ENV}={raw!r} is not a positive number of watts")
    return w


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    from ..calibrate import peak_rss_mb  # one definition (VmHWM where there is one; see there)

    return int(peak_rss_mb() * 2**20)


# ---- model stepping: transformers' forward, or lmpress's runtime ----------------------------------------------

@dataclass
class Generation:
    tokens: torch.Tensor  # [B, steps + 1]: the token picked after the prefill, then one per decode step
    prefill_s: float  # forward pass over the prompt
    ttft_s: float  # prefill + picking the first token
    decode_s: float  # the decode steps
    decode_cpu_s: float  # process CPU seconds during the decode steps
    decode_energy_j: float | None  # RAPL energy during the decode steps; None without RAPL domains


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int,
                    rapl: list[Path] | None = None) -> Generation:
    """Greedy decoding with transformers' KV cache: prefill ids [B, P], then `steps` one-token steps.

    Rows are independent (no padding), so row i gives the same tokens as decoding it alone."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prefill = lambda x: model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # noqa: E731
    step = lambda tok, i: model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1]  # noqa: E731
    return _timed_greedy(prefill, step, ids, steps, rapl)


def generate_greedy_runtime(runner, ids: torch.Tensor, steps: int, rapl: list[Path] | None = None) -> Generation:
    """The same through lmpress's runtime (a runner from lmpress.runtime.make_runner, max_batch >= B)."""
    P = ids.shape[1]
    buf = [None]  # the last logits, written again by the next decode step (NativeRunner.decode's out)

    def step(tok, i):
        buf[0] = runner.decode(tok[:, 0], P + i, out=buf[0] if tok.shape[0] == 1 else None)
        return buf[0]

    return _timed_greedy(lambda x: runner.prefill(x), step, ids, steps, rapl)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] → the greedy tokens [B, 1] (one row on the CPU through sampling.greedy_token: fast)."""
    if logits.shape[0] == 1 and logits.device.type == "cpu":
        return torch.tensor([[greedy_token(logits[0])]])
    return logits.argmax(-1, keepdim=True)


def _timed_greedy(prefill, step, ids: torch.Tensor, steps: int, rapl: list[Path] | None) -> Generation:
    """prefill(ids [B, P]) -> last logits [B, V]; step(tok [B, 1], i) -> logits [B, V] of decode step i."""
    dev = ids.device
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        logits = prefill(ids)
        _sync(dev)
        t1 = time.perf_counter()
        tok = greedy_ids(logits)  # [B, 1]
        out = [tok]
        _sync(dev)
        t2 = time.perf_counter()
        cpu0, e0 = cpu_seconds(), read_rapl(rapl) if rapl else None
        for i in range(steps):
            tok = greedy_ids(step(tok, i))
            out.append(tok)
        _sync(dev)
        t3 = time.perf_counter()
        cpu1, e1 = cpu_seconds(), read_rapl(rapl) if rapl else None
    return Generation(tokens=torch.cat(out, dim=1), prefill_s=t1 - t0, ttft_s=t2 - t0, decode_s=t3 - t2,
                      decode_cpu_s=cpu1 - cpu0, decode_energy_j=rapl_joules(rapl, e0, e1) if rapl else None)


# ---- the benchmark ----------------------------------------------------------------------------------------

def bench_prompt(lm, batch: int, prompt_tokens: int) -> torch.Tensor:
    """Deterministic prompt ids [batch, prompt_tokens]: BOS then seeded uniform ids, a different seed per row."""
    vocab = int(lm.config.vocab_size)
    try:
        vocab = min(vocab, len(lm.tokenizer))
    except TypeError:
        pass
    bos = lm.bos_id
    rows = []
    for i in range(batch):
        g = torch.Generator().manual_seed(PROMPT_SEED + i)
        row = torch.randint(0, vocab, (prompt_tokens,), generator=g)
        if bos is not None:
            row[0] = bos
        rows.append(row)
    return torch.stack(rows)


def machine_info(threads: int) -> dict:
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": threads}


def _check(threads, batch, prompt_tokens, gen_tokens, repeats, warmup, max_positions) -> None:
    for name, v, least in [("threads", threads, 1), ("batch", batch, 1), ("prompt_tokens", prompt_tokens, 1),
                           ("gen_tokens", gen_tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise BadInput(f"bench: {name} must be an integer >= {least}, got {v!r}")
    if max_positions is not None and prompt_tokens + gen_tokens > max_positions:
        raise BadInput(f"bench: prompt_tokens + gen_tokens = {prompt_tokens + gen_tokens} exceeds the model's "
                       f"limit of {max_positions} positions; lower one of them")


def bench(lm, threads: int = 2, batch: int = 1, prompt_tokens: int = 128, gen_tokens: int = 64,
          repeats: int = 3, warmup: int = 1, progress: bool = False, engine: str = "lmpress") -> dict:
    """Speed, size and energy of `lm` (a LoadedModel). The keys are listed in this module's docstring.

    engine "lmpress": lmpress's runtime (its native forward where the family has one, else transformers');
    "transformers": transformers' forward with its DynamicCache (the reference path)."""
    _check(threads, batch, prompt_tokens, gen_tokens, repeats, warmup, lm.max_positions)
    if engine not in ("lmpress", "transformers"):
        raise BadInput(f"bench: engine must be 'lmpress' or 'transformers', got {engine!r}")
    watts = watts_per_core()  # fail on a bad override before spending time
    model = lm.model
    device = next(model.parameters()).device
    ids = bench_prompt(lm, batch, prompt_tokens).to(device)
    rapl = rapl_domains()

    runner = None
    if engine == "lmpress":
        from ..runtime.model import NativeRunner, native_support

        if native_support(lm) is None:
            runner = NativeRunner(lm, max_batch=batch, max_len=prompt_tokens + gen_tokens + 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        with progress_bar(warmup + repeats, f"bench {lm.name}", progress, unit="run") as bar:
            for i in range(warmup + repeats):
                if runner is not None:
                    g = generate_greedy_runtime(runner, ids, gen_tokens, rapl)
                else:
                    g = generate_greedy(model, ids, gen_tokens, rapl)
                if i >= warmup:
                    runs.append(g)
                bar.update(1)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

    prefill_s = statistics.median(r.prefill_s for r in runs)
    decode_s = statistics.median(r.decode_s for r in runs)
    decoded = batch * gen_tokens * len(runs)  # tokens from all timed decode phases
    cpu_s = sum(r.decode_cpu_s for r in runs)
    if rapl:
        energy, source, w = sum(r.decode_energy_j for r in runs), "rapl", None
    else:
        energy, source, w = cpu_s * watts, ESTIMATE_LABEL, watts
    mem_bytes, params = model_storage(model)
    return {
        "size_bytes": lm.disk_bytes,
        "memory_bytes": mem_bytes,
        "params": params,
        "bits_per_weight": lm.disk_bytes * 8 / lm.disk_params if lm.disk_bytes and lm.disk_params else None,
        "memory_bits_per_weight": mem_bytes * 8 / params if params else None,
        "load_s": lm.load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "prefill_tokens_per_s": batch * prompt_tokens / prefill_s,
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "decode_tokens_per_s": batch * gen_tokens / decode_s,
        "decode_tokens_per_s_per_seq": gen_tokens / decode_s,
        "decode_ms_per_token": decode_s / gen_tokens * 1000,
        "energy_j_per_token": energy / decoded,
        "energy_source": source,
        "watts_per_core": w,
        "decode_cpu_s_per_token": cpu_s / decoded,
        "engine": "lmpress" if runner is not None else "transformers",
        "threads": threads,
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "machine": machine_info(used_threads),
    }
