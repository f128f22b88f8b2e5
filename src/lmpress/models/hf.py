"""transformers folders (config + safetensors, sharded or not, tokenizer) and the local Hugging Face cache.

Only safetensors are read: a folder that has nothing but pickled `pytorch_model.bin` weights is refused,
because unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import CorruptModel, ModelNotFound, UnsupportedModel


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header and that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptModel(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CorruptModel(f"{path}: not a valid safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptModel(f"{path}: the safetensors header is not valid JSON: the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptModel(f"{path}: the safetensors header is not a JSON object: the file is corrupt")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CorruptModel(f"{path}: tensors need {8 + n + end} bytes but the file has {size}: the file is "
                           f"truncated, copy or download it again")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise CorruptModel(f"{index}: not a valid safetensors index") from None
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CorruptModel(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise UnsupportedModel(f"{folder}: only pickled weights (.bin/.pt) found; lmpress never unpickles files. "
                               f"Convert them to safetensors first (transformers: model.save_pretrained(dir))")
    raise CorruptModel(f"{folder}: has config.json but no *.safetensors weights")


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
        except (json.JSONDecodeError, OSError, AttributeError):
            raise CorruptModel(f"{folder}/config.json is not valid JSON") from None
        raise UnsupportedModel(f"{folder}: architecture '{model_type}' is not supported by the installed "
                               f"transformers ({str(e).splitlines()[0][:120]})") from None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, TypeError) as first:
        # a bare SentencePiece model beside the weights (llama2.c exports such as stories260K)
        sp = [p for p in folder.glob("*.model") if p.stat().st_size < 50 << 20]
        if len(sp) == 1:
            return AutoTokenizer.from_pretrained(folder, vocab_file=str(sp[0]))
        raise UnsupportedModel(f"{folder}: no usable tokenizer ({str(first).splitlines()[0][:120]})") from None


def load_folder(folder: Path, dtype=torch.float32):
    """(model, tokenizer, config) from a transformers folder holding safetensors weights."""
    from transformers import AutoModelForCausalLM

    config = load_config(folder)
    for f in weight_files(folder):
        check_safetensors(f)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True)
    except ValueError as e:
        raise UnsupportedModel(f"{folder}: transformers has no causal-LM class for '{config.model_type}' "
                               f"({str(e).splitlines()[0][:120]})") from None
    return model, load_tokenizer(folder), config


def hub_snapshot(repo_id: str, download: bool = False) -> Path:
    """A model id's folder in the local Hugging Face cache; fetched from the hub only when `download`."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=not download, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many types (offline, not found, gated)
        hint = ("it is not in the local Hugging Face cache; pass --download to fetch it (needs network)"
                if not download else f"download failed: {str(e).splitlines()[0][:160]}")
        raise ModelNotFound(f"model '{repo_id}': {hint}") from None
