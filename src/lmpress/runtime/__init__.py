"""Generation runtime: lmpress's own forward pass with a preallocated KV cache, sampling, streaming,
continuous batching and speculative decoding.

    from lmpress.runtime import Engine, SamplingParams
    engine = Engine(lm)                                  # lm: a LoadedModel
    print(engine.generate("Once upon a time", SamplingParams(max_tokens=32)).text)

See engine.py for the scheduler a server drives, model.py for the forward pass, speculative.py for drafts,
docs/runtime.md for the whole.
"""

from .engine import Completion, Engine, Event, Scheduler, Stream, generate
from .model import HFRunner, NativeRunner, make_runner, native_support
from .sampling import SamplingParams, TextStream, distribution, pick_token
from .speculative import speculative_generate, speculative_stream

__all__ = ["Completion", "Engine", "Event", "HFRunner", "NativeRunner", "SamplingParams", "Scheduler", "Stream",
           "TextStream", "distribution", "generate", "make_runner", "native_support", "pick_token",
           "speculative_generate", "speculative_stream"]
