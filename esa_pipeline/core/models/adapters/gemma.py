"""Gemma family (Gemma, Gemma 2, Gemma 3 text): RMSNorm gains act as (1 + w), sqrt(H)-scaled tied embeddings.

Gemma:   Llama-like pre-norm block (input_layernorm -> attention, post_attention_layernorm -> GeGLU MLP).
Gemma 2: sandwich norms. `post_attention_layernorm` normalises the ATTENTION OUTPUT before the residual add
         (norm.attn_out), `pre_feedforward_layernorm` feeds the MLP (norm.ffn_in), `post_feedforward_layernorm`
         normalises its output (norm.ffn_out); final logits are soft-capped: cap · tanh(logits / cap).
Gemma 3: Gemma 2 plus per-head q_norm/k_norm (RMSNorm over head_dim, also (1 + w)) and sliding/full layer
         types (a mask per layer, no extra parameters).
Source: transformers 5.x models/gemma*/modeling_gemma*.py (GemmaRMSNorm: output * (1.0 + weight)).
"""

from __future__ import annotations

import torch

from . import _layouts as L
from .base import Adapter, register

_SANDWICH = {
    "norm.attn_in": L.module("input_layernorm"),
    "norm.attn_out": L.module("post_attention_layernorm"),
    "norm.ffn_in": L.module("pre_feedforward_layernorm"),
    "norm.ffn_out": L.module("post_feedforward_layernorm"),
}
_DENSE = {"moe.router": "dense model", "moe.shared_expert": "dense model"}
_NO_QK_NORM = {"attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms"}


def _soft_capped(adapter: Adapter, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # Gemma2ForCausalLM.forward: logits / cap -> tanh -> * cap, when final_logit_softcapping is set.
    logits = adapter.lm_head(model)(hidden)
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


@register("GemmaForCausalLM")
class GemmaAdapter(Adapter):
    family = "gemma"
    norm_gain_offset = 1.0
    _components = {
        **L.separate_attention(),
        **L.gated_mlp(),
        "norm.attn_in": L.module("input_layernorm"),
        "norm.ffn_in": L.module("post_attention_layernorm"),  # Gemma 1 is pre-norm like Llama
    }
    lacks = {
        **_NO_QK_NORM,
        "norm.attn_out": "pre-norm only: attention output is added to the residual unnormalised",
        "norm.ffn_out": "pre-norm only: MLP output is added to the residual unnormalised",
        **_DENSE,
    }


@register("Gemma2ForCausalLM")
class Gemma2Adapter(Adapter):
    family = "gemma2"
    norm_gain_offset = 1.0
    aliases = {"norm.input": "norm.attn_in", "norm.post_attention": "norm.attn_out"}
    _components = {**L.separate_attention(), **L.gated_mlp(), **_SANDWICH}
    lacks = {**_NO_QK_NORM, **_DENSE}

    def head_logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _soft_capped(self, model, hidden)


@register("Gemma3ForCausalLM")
class Gemma3Adapter(Adapter):
    family = "gemma3"
    norm_gain_offset = 1.0
    aliases = Gemma2Adapter.aliases
    _components = {
        **L.separate_attention(),
        "attention.q_norm": L.module("self_attn.q_norm"),  # [head_dim], shared by every head
        "attention.k_norm": L.module("self_attn.k_norm"),
        **L.gated_mlp(),
        **_SANDWICH,
    }
    lacks = dict(_DENSE)

    def head_logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _soft_capped(self, model, hidden)
