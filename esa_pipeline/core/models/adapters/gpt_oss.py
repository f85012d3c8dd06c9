"""GPT-OSS: experts stored [E, H, 2I] with gate and up INTERLEAVED along the last dim, biased experts and router,
attention sinks.

GptOssExperts._apply_gate: gate, up = gate_up[..., ::2], gate_up[..., 1::2], so gate is every even column and
up every odd column of gate_up_proj [E, H, 2I] (and of its bias [E, 2I]); neurons are the last axis (columns,
as the weights are [in, out]). down_proj is [E, I, H] (neurons are rows) with bias [E, H]. The router is a
biased linear [E, H] + [E]. Per-head attention sinks (`self_attn.sinks`, [heads]) are logits, not a role.
Source: transformers 5.x models/gpt_oss/modeling_gpt_oss.py.
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, ParamSlice, register


def _experts(expert: int | None) -> tuple:
    return (slice(None),) if expert is None else (expert,)


def _interleaved(half: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        cols = slice(half, None, 2)  # a strided view: still basic indexing
        # x @ gate_up_proj[e]: stored [E, H, 2I], so the inputs (H) are axis 1 of [E, H, I] / axis 0 of [H, I]
        weight = ParamSlice(a.layer_param(layer, "mlp.experts.gate_up_proj"), None,
                            (*_experts(expert), slice(None), cols), 2 if expert is None else 1,
                            input_axis=1 if expert is None else 0)
        bias = ParamSlice(a.layer_param(layer, "mlp.experts.gate_up_proj_bias"), None, (*_experts(expert), cols),
                          1 if expert is None else 0)
        return [weight, bias]

    return build


def _down(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    # x @ down_proj[e]: stored [E, I, H], so the inputs (I) are axis 1 of [E, I, H] / axis 0 of [I, H]
    return [ParamSlice(a.layer_param(layer, "mlp.experts.down_proj"), None, _experts(expert), 1 if expert is None
                       else 0, input_axis=1 if expert is None else 0),
            ParamSlice(a.layer_param(layer, "mlp.experts.down_proj_bias"), None, _experts(expert), None)]


def _router(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    rows = () if expert is None else (slice(expert, expert + 1),)  # row e and bias entry e score expert e
    return [ParamSlice(a.layer_param(layer, "mlp.router.weight"), None, rows, None),
            ParamSlice(a.layer_param(layer, "mlp.router.bias"), None, rows, None)]


@register("GptOssForCausalLM")
class GptOssAdapter(Adapter):
    family = "gpt_oss"
    router_suffix = "mlp.router"
    unmapped = (".self_attn.sinks",)  # attention-sink logits per head: no role
    _components = {
        **L.separate_attention(),
        "ffn.gate": _interleaved(0),
        "ffn.up": _interleaved(1),
        "ffn.down": _down,
        "norm.attn_in": L.module("input_layernorm"),
        "norm.ffn_in": L.module("post_attention_layernorm"),
        "moe.router": _router,
    }
    lacks = {
        "attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms",
        "norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only",
        "moe.shared_expert": "no shared expert: every expert is routed",
    }
