"""Phi-3 layout: contiguous fused qkv_proj rows Q|K|V and gate_up_proj rows gate|up."""

from __future__ import annotations

from .base import Adapter, ParamSlice, register
from .llama import LlamaAdapter


def _qkv_rows(a: Adapter, part: int) -> slice:
    q_rows = a.n_heads * a.head_dim  # Phi3Attention splits its output at these sizes
    kv_rows = a.n_kv_heads * a.head_dim
    bounds = (0, q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows)
    return slice(bounds[part], bounds[part + 1])


def _qkv(part: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        name = a.layer_param(layer, "self_attn.qkv_proj.weight")  # [(Hq + 2 Hkv) * hd, H]
        out = [ParamSlice(name, None, (_qkv_rows(a, part),), None)]
        bias = a.layer_param(layer, "self_attn.qkv_proj.bias")
        if a.has_param(bias):
            out.append(ParamSlice(bias, None, (_qkv_rows(a, part),), None))
        return out

    return build


def _gate_up(half: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        rows = slice(half * a.intermediate_size, (half + 1) * a.intermediate_size)  # Phi3MLP: chunk(2) of output
        return [ParamSlice(a.layer_param(layer, "mlp.gate_up_proj.weight"), None, (rows,), 0)]  # [2I, H]

    return build


@register("Phi3ForCausalLM")
class Phi3Adapter(Adapter):
    family = "phi3"
    _components = {
        "attention.query": _qkv(0),
        "attention.key": _qkv(1),
        "attention.value": _qkv(2),
        "attention.output": lambda a, layer, expert: a.whole(layer, "self_attn.o_proj"),
        "ffn.gate": _gate_up(0),
        "ffn.up": _gate_up(1),
        "ffn.down": lambda a, layer, expert: a.whole(layer, "mlp.down_proj", weight_axis=1),  # [H, I]
        "norm.attn_in": lambda a, layer, expert: a.whole(layer, "input_layernorm"),
        "norm.ffn_in": lambda a, layer, expert: a.whole(layer, "post_attention_layernorm"),
    }
    lacks = LlamaAdapter.lacks
