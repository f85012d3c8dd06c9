"""Llama-like pre-norm families with small differences: StableLM (LayerNorms with bias, q/k/v biases),
Granite (embedding/residual/attention multipliers and `logits_scaling`), StarCoder2 (LayerNorms, biased
GELU MLP `c_fc`/`c_proj` without a gate).

Granite's multipliers act on activations, not on weights, so the components map as in Llama; its forward
divides the head's logits by `logits_scaling`, which `head_logits` reproduces. Source: transformers 5.x
models/{stablelm,granite,starcoder2}/modeling_*.py.
"""

from __future__ import annotations

import torch

from . import _layouts as L
from .base import Adapter, register
from .llama import LlamaAdapter

_PRE_NORM = {"norm.attn_in": L.module("input_layernorm"), "norm.ffn_in": L.module("post_attention_layernorm")}


@register("StableLmForCausalLM")
class StableLmAdapter(Adapter):
    family = "stablelm"
    _components = {**L.separate_attention(), **L.gated_mlp(), **_PRE_NORM}
    lacks = {
        **LlamaAdapter.lacks,
        "attention.q_norm": "StableLM's optional per-head qk_layernorm is not mapped",
        "attention.k_norm": "StableLM's optional per-head qk_layernorm is not mapped",
    }


@register("GraniteForCausalLM")
class GraniteAdapter(Adapter):
    family = "granite"
    _components = {**L.separate_attention(), **L.gated_mlp(), **_PRE_NORM}
    lacks = LlamaAdapter.lacks

    def head_logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # GraniteForCausalLM.forward: logits = lm_head(hidden) / config.logits_scaling
        return self.lm_head(model)(hidden) / self.config.logits_scaling


@register("Starcoder2ForCausalLM")
class Starcoder2Adapter(Adapter):
    family = "starcoder2"
    _components = {**L.separate_attention(), "ffn.up": L.ffn_in("mlp.c_fc"), "ffn.down": L.ffn_out("mlp.c_proj"),
                   **_PRE_NORM}
    lacks = {**LlamaAdapter.lacks, "ffn.gate": "GELU MLP without a gate"}
