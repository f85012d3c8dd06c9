"""Llama-family layout (Llama, Mistral, SmolLM2): separate q/k/v/o and gate/up/down projections."""

from __future__ import annotations

from .base import Adapter, register


def _attn(module: str):
    return lambda a, layer, expert: a.whole(layer, f"self_attn.{module}")


def _norm(module: str):
    return lambda a, layer, expert: a.whole(layer, module)


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaAdapter(Adapter):
    layers_path = "model.layers"
    final_norm_path = "model.norm"
    embedding_path = "model.embed_tokens"
    lm_head_path = "lm_head"
    _components = {
        "attention.query": _attn("q_proj"),
        "attention.key": _attn("k_proj"),
        "attention.value": _attn("v_proj"),
        "attention.output": _attn("o_proj"),
        # gate/up weights are [I, H]: neurons are rows; down is [H, I]: neurons are columns.
        "ffn.gate": lambda a, layer, expert: a.whole(layer, "mlp.gate_proj", weight_axis=0, bias_axis=0),
        "ffn.up": lambda a, layer, expert: a.whole(layer, "mlp.up_proj", weight_axis=0, bias_axis=0),
        "ffn.down": lambda a, layer, expert: a.whole(layer, "mlp.down_proj", weight_axis=1),
        "norm.input": _norm("input_layernorm"),
        "norm.post_attention": _norm("post_attention_layernorm"),
    }


