"""lmpress: smaller, faster language models, with an honest account of what it cost.

Public API (see README):
    load(source=None)                       -> LoadedModel
    save(lm, out, recipe=None)              -> Path
    perplexity(lm, text, ctx=512, ...)      -> dict
    kl_divergence(lm, base, text, ...)      -> dict
    zero_shot(lm, tasks, limit=None, ...)   -> dict
    bench(lm, threads=..., batch=...)       -> dict
"""

__version__ = "0.1.0"

from .errors import LmpressError  # noqa: E402
from .models import LoadedModel, load, wrap  # noqa: E402
from .models.io import save  # noqa: E402

__all__ = ["LmpressError", "LoadedModel", "load", "save", "wrap", "__version__"]
