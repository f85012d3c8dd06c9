"""Reusable slice builders the family files compose (a family file stays a declaration).

Each builder is `builder(adapter, layer, expert) -> list[ParamSlice]`. `neuron_axis` marks the FFN
intermediate-neuron axis of a slice (rows of gate/up `nn.Linear` weights [I, H], columns of down [H, I]).
"""

from __future__ import annotations

from .base import Adapter, ParamSlice, SliceBuilder


def module(path: str, *, weight_axis: int | None = None, bias_axis: int | None = None) -> SliceBuilder:
    """The weight (and bias, if present) of the submodule `path` of a decoder layer."""
    return lambda a, layer, expert: a.whole(layer, path, weight_axis=weight_axis, bias_axis=bias_axis)


def ffn_in(path: str) -> SliceBuilder:
    """An `nn.Linear` H -> I (gate/up): neurons are weight rows and bias entries."""
    return module(path, weight_axis=0, bias_axis=0)


def ffn_out(path: str) -> SliceBuilder:
    """An `nn.Linear` I -> H (down): neurons are weight columns; its bias [H] has no neuron axis."""
    return module(path, weight_axis=1)


def separate_attention(prefix: str = "self_attn", q: str = "q_proj", k: str = "k_proj", v: str = "v_proj",
                       o: str = "o_proj") -> dict[str, SliceBuilder]:
    """Query/key/value/output as four `nn.Linear`s (Llama, Qwen, Gemma, OLMo, StableLM, Granite, ...)."""
    return {"attention.query": module(f"{prefix}.{q}"), "attention.key": module(f"{prefix}.{k}"),
            "attention.value": module(f"{prefix}.{v}"), "attention.output": module(f"{prefix}.{o}")}


def gated_mlp(prefix: str = "mlp") -> dict[str, SliceBuilder]:
    """gate_proj/up_proj/down_proj (SwiGLU/GeGLU MLPs)."""
    return {"ffn.gate": ffn_in(f"{prefix}.gate_proj"), "ffn.up": ffn_in(f"{prefix}.up_proj"),
            "ffn.down": ffn_out(f"{prefix}.down_proj")}


def _expert_index(expert: int | None) -> tuple:
    return (slice(None),) if expert is None else (expert,)


def fused_experts(part: str, prefix: str = "mlp.experts") -> SliceBuilder:
    """transformers-5 fused experts: gate_up_proj [E, 2I, H] (output chunked gate|up), down_proj [E, H, I].

    Expert None = every expert ([E, ...] slices), else one expert's [I, H] / [H, I]."""

    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        if part == "down":
            neuron_axis = 2 if expert is None else 1
            return [ParamSlice(a.layer_param(layer, f"{prefix}.down_proj"), None, _expert_index(expert),
                               neuron_axis)]
        name = a.layer_param(layer, f"{prefix}.gate_up_proj")
        inter = a.param_shape(name)[1] // 2  # moe_intermediate_size where the family has one
        half = 0 if part == "gate" else 1
        rows = slice(half * inter, (half + 1) * inter)
        return [ParamSlice(name, None, (*_expert_index(expert), rows), 1 if expert is None else 0)]

    return build


def router(path: str = "mlp.gate.weight") -> SliceBuilder:
    """The top-k router's weight [E, H]; row e scores expert e (expert None = the whole router)."""

    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        index = () if expert is None else (expert,)
        return [ParamSlice(a.layer_param(layer, path), None, index, None)]

    return build
