"""Llama-family layout (Llama, Mistral, SmolLM2): separate q/k/v/o and gate/up/down, pre-norm RMSNorms."""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, register


@register("LlamaForCausalLM", "MistralForCausalLM", families=("mistral",))
class LlamaAdapter(Adapter):
    family = "llama"
    _components = {
        **L.separate_attention(),
        **L.gated_mlp(),
        "norm.attn_in": L.module("input_layernorm"),
        "norm.ffn_in": L.module("post_attention_layernorm"),  # Llama's "post attention" norm feeds the MLP
    }
    lacks = {
        "attention.q_norm": "no query/key norms",
        "attention.k_norm": "no query/key norms",
        "norm.attn_out": "pre-norm only: attention output is added to the residual unnormalised",
        "norm.ffn_out": "pre-norm only: MLP output is added to the residual unnormalised",
        "moe.router": "dense model",
        "moe.shared_expert": "dense model",
    }
