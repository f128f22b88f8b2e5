"""Where things live in each model family, so that no algorithm hard-codes module names.

An ArchSpec names, as dotted paths, the block list, the embeddings, the final norm and the output head,
and inside one block the attention projections, the MLP projections and the norms. Algorithms ask
`spec.blocks(model)`, `spec.linears(block)` and so on; adding a family is adding one row to `SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModel


@dataclass(frozen=True)
class ArchSpec:
    family: str
    blocks: str  # path of the nn.ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    # inside a block; None where the family has no such module
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None  # fused projection (GPT-2's c_attn)
    o: str
    gate: str | None
    up: str
    down: str
    attn_norm: str
    mlp_norm: str
    pos_embed: str | None = None  # learned absolute positions (GPT-2, OPT)
    # config keys structured pruning shrinks (prune/structured.py); None where the config has no such key.
    # Head pruning needs `head_dim_key`: a config whose head width is not hidden_size / heads (GPT-2, OPT
    # derive it, so their heads cannot be removed while the residual width stays)
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    mlp_key: str = "intermediate_size"
    head_dim_key: str | None = "head_dim"

    def get(self, root: torch.nn.Module, path: str | None):
        if path is None:
            return None
        mod = root
        for part in path.split("."):
            mod = getattr(mod, part)
        return mod

    def block_list(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.get(model, self.blocks)

    def attention_linears(self) -> list[str]:
        return [p for p in (self.q, self.k, self.v, self.qkv, self.o) if p]

    def mlp_linears(self) -> list[str]:
        return [p for p in (self.gate, self.up, self.down) if p]

    def linears(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Projection modules of one block by their path inside it, in execution order."""
        return {p: self.get(block, p) for p in self.attention_linears() + self.mlp_linears()}


_LLAMA = dict(blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
              q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv=None, o="self_attn.o_proj",
              gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
              attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")

SPECS: dict[str, ArchSpec] = {
    **{name: ArchSpec(family=name, **_LLAMA) for name in ("llama", "qwen2", "qwen3", "mistral", "gemma", "granite")},
    # Gemma 2 norms the MLP input with pre_feedforward_layernorm (post_attention_layernorm norms the attention
    # output): the op that feeds gate/up is the pre-feedforward one
    "gemma2": ArchSpec(family="gemma2", **{**_LLAMA, "mlp_norm": "pre_feedforward_layernorm"}),
    "gpt2": ArchSpec(family="gpt2", blocks="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
                     lm_head="lm_head", q=None, k=None, v=None, qkv="attn.c_attn", o="attn.c_proj", gate=None,
                     up="mlp.c_fc", down="mlp.c_proj", attn_norm="ln_1", mlp_norm="ln_2", pos_embed="transformer.wpe",
                     layers_key="n_layer", heads_key="n_head", kv_heads_key=None, mlp_key="n_inner",
                     head_dim_key=None),
    "opt": ArchSpec(family="opt", blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
                    final_norm="model.decoder.final_layer_norm", lm_head="lm_head", q="self_attn.q_proj",
                    k="self_attn.k_proj", v="self_attn.v_proj", qkv=None, o="self_attn.out_proj", gate=None,
                    up="fc1", down="fc2", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
                    pos_embed="model.decoder.embed_positions", kv_heads_key=None, mlp_key="ffn_dim",
                    head_dim_key=None),
}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return SPECS[model_type]
    except KeyError:
        raise UnsupportedModel(f"no ArchSpec for model family '{model_type}' (known: {', '.join(sorted(SPECS))}); "
                               f"evaluation works, but compression needs a row in lmpress/models/arch.py") from None
