"""OLMo family: OLMo (non-parametric LayerNorms), OLMo 2 (post-norms only, full-width q/k norms), OLMoE.

OLMo:  OlmoLayerNorm has no weight or bias (F.layer_norm with None), so every norm role is NOT APPLICABLE:
       there is nothing to perturb, and the sweep says so instead of silently skipping.
OLMo2: no input_layernorm; `post_attention_layernorm` normalises the attention OUTPUT (norm.attn_out) and
       `post_feedforward_layernorm` the MLP output (norm.ffn_out); q_norm/k_norm are RMSNorms over the full
       projection width (heads × head_dim), not per head.
OLMoE: pre-norm (norm.attn_in, norm.ffn_in), full-width q/k norms, fused 3-D experts and a top-k router.
Source: transformers 5.x models/olmo{,2,e}/modeling_*.py.
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, register

_QK_NORM = {"attention.q_norm": L.module("self_attn.q_norm"), "attention.k_norm": L.module("self_attn.k_norm")}
_DENSE = {"moe.router": "dense model", "moe.shared_expert": "dense model"}
_NON_PARAMETRIC = "OLMo's LayerNorm is non-parametric (no gain or bias): nothing to perturb"


@register("OlmoForCausalLM")
class OlmoAdapter(Adapter):
    family = "olmo"
    _components = {**L.separate_attention(), **L.gated_mlp()}
    lacks = {
        "attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms",
        **{role: _NON_PARAMETRIC for role in ("norm.attn_in", "norm.ffn_in", "norm.final")},
        "norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only", **_DENSE,
    }


@register("Olmo2ForCausalLM")
class Olmo2Adapter(Adapter):
    family = "olmo2"
    aliases = {"norm.input": None, "norm.post_attention": "norm.attn_out"}
    _components = {
        **L.separate_attention(), **_QK_NORM, **L.gated_mlp(),
        "norm.attn_out": L.module("post_attention_layernorm"),
        "norm.ffn_out": L.module("post_feedforward_layernorm"),
    }
    lacks = {
        "norm.attn_in": "post-norm only: attention reads the residual stream unnormalised",
        "norm.ffn_in": "post-norm only: the MLP reads the residual stream unnormalised",
        **_DENSE,
    }


@register("OlmoeForCausalLM")
class OlmoeAdapter(Adapter):
    family = "olmoe"
    router_suffix = "mlp.gate"
    _components = {
        **L.separate_attention(), **_QK_NORM,
        "ffn.gate": L.fused_experts("gate"), "ffn.up": L.fused_experts("up"), "ffn.down": L.fused_experts("down"),
        "norm.attn_in": L.module("input_layernorm"), "norm.ffn_in": L.module("post_attention_layernorm"),
        "moe.router": L.router(),
    }
    lacks = {"norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only",
             "moe.shared_expert": "no shared expert: every expert is routed"}
