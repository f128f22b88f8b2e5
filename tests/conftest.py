"""Shared fixtures: tiny models built from configs (no downloads) and the real tiny stories260K."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lmpress

SHARED = Path(os.environ.get("LMPRESS_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (set LMPRESS_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return _need(STORIES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def tokenizer(stories_dir):
    """stories260K's 512-token SentencePiece tokenizer, shared by every tiny model below."""
    from lmpress.models.hf import load_tokenizer

    return load_tokenizer(stories_dir / "hf")


def tiny_config(family: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, **common)
    raise ValueError(family)


def tiny_model(family: str, tokenizer, seed: int = 0) -> lmpress.LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return lmpress.wrap(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny(request, tokenizer) -> lmpress.LoadedModel:
    return tiny_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def stories(stories_dir) -> lmpress.LoadedModel:
    return lmpress.load(stories_dir / "hf")


@pytest.fixture(scope="session")
def stories_text() -> str:
    """Enough text for a few windows: stories260K's own greedy story, repeated with variations."""
    base = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big red ball under a tree. She ran to get it and smiled. ")
    return "".join(base.replace("Lily", n) for n in ["Lily", "Tom", "Sue", "Max", "Ben", "Amy", "Tim", "Sam"] * 4)


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test, restored after: small tensors on a shared 2-core machine run
    faster on one thread than on two that wait for each other (QAT on stories260K: 6 s vs 45 s under load)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
