"""Generation runtime: lmpress's own forward pass with a preallocated KV cache, sampling, streaming,
continuous batching and speculative decoding.

    from lmpress.runtime import Engine, SamplingParams
    engine = Engine(lm)                                  # lm: a LoadedModel
    print(engine.generate("Once upon a time", SamplingParams(max_tokens=32)).text)

See engine.py for the scheduler a server drives, model.py for the forward pass, speculative.py for drafts,
server.py for the OpenAI-compatible HTTP server, docs/runtime.md for the whole.
"""

from .engine import Completion, Engine, Event, Scheduler, Stream, generate
from .model import HFRunner, NativeRunner, make_runner, native_support
from .sampling import SamplingParams, TextStream, distribution, pick_token
from .server import Server, serve
from .speculative import speculative_generate, speculative_stream

__all__ = ["Completion", "Engine", "Event", "HFRunner", "NativeRunner", "SamplingParams", "Scheduler", "Server",
           "Stream", "TextStream", "distribution", "generate", "make_runner", "native_support", "pick_token",
           "serve", "speculative_generate", "speculative_stream"]
