"""Mixtral layout (transformers 5): attention as Llama, experts fused into 3-D tensors, a linear router.

MixtralExperts holds gate_up_proj [E, 2I, H] (output chunked gate|up) and down_proj [E, H, I];
MixtralTopKRouter holds weight [E, H]. Expert None addresses all experts at once.
"""

from __future__ import annotations

from .base import Adapter, ParamSlice, register


def _expert_index(expert: int | None) -> tuple:
    return (slice(None),) if expert is None else (expert,)


def _gate_up(half: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        rows = slice(half * a.intermediate_size, (half + 1) * a.intermediate_size)
        index = (*_expert_index(expert), rows)  # -> [E, I, H] or [I, H]
        neuron_axis = 1 if expert is None else 0
        return [ParamSlice(a.layer_param(layer, "mlp.experts.gate_up_proj"), None, index, neuron_axis)]

    return build


def _down(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    neuron_axis = 2 if expert is None else 1  # [E, H, I] or [H, I]
    return [ParamSlice(a.layer_param(layer, "mlp.experts.down_proj"), None, _expert_index(expert), neuron_axis)]


def _router(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
    # Row e of the router scores expert e; expert None = the whole router.
    index = () if expert is None else (expert,)
    return [ParamSlice(a.layer_param(layer, "mlp.gate.weight"), None, index, None)]  # [E, H]


def _attn(module: str):
    return lambda a, layer, expert: a.whole(layer, f"self_attn.{module}")


@register("MixtralForCausalLM")
class MixtralAdapter(Adapter):
    layers_path = "model.layers"
    final_norm_path = "model.norm"
    embedding_path = "model.embed_tokens"
    lm_head_path = "lm_head"
    router_suffix = "mlp.gate"
    _components = {
        "attention.query": _attn("q_proj"),
        "attention.key": _attn("k_proj"),
        "attention.value": _attn("v_proj"),
        "attention.output": _attn("o_proj"),
        "ffn.gate": _gate_up(0),
        "ffn.up": _gate_up(1),
        "ffn.down": _down,
        "norm.input": lambda a, layer, expert: a.whole(layer, "input_layernorm"),
        "norm.post_attention": lambda a, layer, expert: a.whole(layer, "post_attention_layernorm"),
        "moe.router": _router,
    }
