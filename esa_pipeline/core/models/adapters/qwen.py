"""Qwen family: Qwen2 (q/k/v biases), Qwen3 (per-head q_norm/k_norm), Qwen2-MoE (fused experts, router, a
shared expert with a sigmoid gate), Qwen3-MoE (q/k norms, fused experts, no shared expert).

All are Llama-like pre-norm blocks: `post_attention_layernorm` feeds the MLP (norm.ffn_in). Qwen3's q_norm /
k_norm are RMSNorms over head_dim shared by all heads. MoE experts: transformers-5 fused 3-D tensors
(`_layouts.fused_experts`). Source: transformers 5.x models/qwen{2,3}{,_moe}/modeling_*.py.
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, ParamSlice, register
from .llama import LlamaAdapter

_PRE_NORM = {"norm.attn_in": L.module("input_layernorm"), "norm.ffn_in": L.module("post_attention_layernorm")}
_QK_NORM = {"attention.q_norm": L.module("self_attn.q_norm"), "attention.k_norm": L.module("self_attn.k_norm")}
_NO_POST_NORMS = {k: LlamaAdapter.lacks[k] for k in ("norm.attn_out", "norm.ffn_out")}


def _moe_or_dense(part: str):
    """Routed experts in MoE layers; the dense MLP in `mlp_only_layers` / off-`decoder_sparse_step` layers."""
    experts, dense = L.fused_experts(part), L.gated_mlp()[f"ffn.{part}"]

    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        if a.has_param(a.layer_param(layer, "mlp.experts.down_proj")):
            return experts(a, layer, expert)
        if expert is not None:
            raise ValueError(f"layer {layer} of {a.architecture} is a dense MLP layer: pass expert=None")
        return dense(a, layer, expert)

    return build


def _shared_expert(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    # Qwen2MoeSparseMoeBlock: out += sigmoid(shared_expert_gate(x)) * shared_expert(x): both are the shared path.
    out = []
    for module, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        out += a.whole(layer, f"mlp.shared_expert.{module}", weight_axis=axis)
    return out + a.whole(layer, "mlp.shared_expert_gate")


def _moe_router(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    if not a.has_param(a.layer_param(layer, "mlp.gate.weight")):
        raise ValueError(f"layer {layer} of {a.architecture} is a dense MLP layer: it has no router")
    return L.router()(a, layer, expert)


@register("Qwen2ForCausalLM")
class Qwen2Adapter(Adapter):
    family = "qwen2"
    _components = {**L.separate_attention(), **L.gated_mlp(), **_PRE_NORM}
    lacks = LlamaAdapter.lacks


@register("Qwen3ForCausalLM")
class Qwen3Adapter(Adapter):
    family = "qwen3"
    _components = {**L.separate_attention(), **_QK_NORM, **L.gated_mlp(), **_PRE_NORM}
    lacks = {**_NO_POST_NORMS, "moe.router": "dense model", "moe.shared_expert": "dense model"}


_MOE_FFN = {"ffn.gate": _moe_or_dense("gate"), "ffn.up": _moe_or_dense("up"), "ffn.down": _moe_or_dense("down"),
            "moe.router": _moe_router}


@register("Qwen2MoeForCausalLM")
class Qwen2MoeAdapter(Adapter):
    family = "qwen2_moe"
    router_suffix = "mlp.gate"
    _components = {**L.separate_attention(), **_MOE_FFN, "moe.shared_expert": _shared_expert, **_PRE_NORM}
    lacks = {**_NO_POST_NORMS, "attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms"}


@register("Qwen3MoeForCausalLM")
class Qwen3MoeAdapter(Adapter):
    family = "qwen3_moe"
    router_suffix = "mlp.gate"
    _components = {**L.separate_attention(), **_QK_NORM, **_MOE_FFN, **_PRE_NORM}
    lacks = {**_NO_POST_NORMS, "moe.shared_expert": "no shared expert: every expert is routed"}
