"""lmpress: smaller, faster language models, with an honest account of what it cost.

Public API:
    load(source=None) -> LoadedModel          a .gguf file, a transformers/lmpress folder, a cached hub id
    wrap(model, tokenizer) -> LoadedModel     a transformers model already in memory
    compress(lm, recipe) -> lm                apply a recipe (preset name, YAML/JSON file, list of steps)
    save(lm, out, recipe=None) -> Path        safetensors + config + tokenizer + manifest, atomically
    evaluate(lm, base=None, ...) -> dict      what `lmpress eval` reports
    perplexity, kl_divergence, zero_shot, bench   the evaluators one by one
    generate(lm, prompt, max_tokens=128, ...)  text generation (lmpress.runtime: engine, batching, speculative)
"""

__version__ = "0.1.0"

from .compress import compress  # noqa: E402
from .errors import LmpressError  # noqa: E402
from .eval import evaluate  # noqa: E402
from .eval.bench import bench  # noqa: E402
from .eval.kld import kl_divergence  # noqa: E402
from .eval.perplexity import perplexity  # noqa: E402
from .eval.tasks import zero_shot  # noqa: E402
from .models import LoadedModel, load, wrap  # noqa: E402
from .models.io import save  # noqa: E402
from .runtime import generate  # noqa: E402

__all__ = ["LmpressError", "LoadedModel", "bench", "compress", "evaluate", "generate", "kl_divergence", "load",
           "perplexity", "save", "wrap", "zero_shot", "__version__"]
