"""Mixtral layout (transformers 5): attention as Llama, experts fused into 3-D tensors, a linear router.

MixtralExperts holds gate_up_proj [E, 2I, H] (output chunked gate|up) and down_proj [E, H, I];
MixtralTopKRouter holds weight [E, H]. Expert None addresses all experts at once.
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, register
from .llama import LlamaAdapter


@register("MixtralForCausalLM")
class MixtralAdapter(Adapter):
    family = "mixtral"
    router_suffix = "mlp.gate"
    _components = {
        **L.separate_attention(),
        "ffn.gate": L.fused_experts("gate"),
        "ffn.up": L.fused_experts("up"),
        "ffn.down": L.fused_experts("down"),
        "norm.attn_in": L.module("input_layernorm"),
        "norm.ffn_in": L.module("post_attention_layernorm"),
        "moe.router": L.router(),
    }
    lacks = {k: v for k, v in LlamaAdapter.lacks.items() if k != "moe.router"} | {
        "moe.shared_expert": "no shared expert: every expert is routed"}
