"""GPT-NeoX layout (Pythia): per-head interleaved fused QKV, GELU MLP without a gate, LayerNorms with bias."""

from __future__ import annotations

from .base import Adapter, ParamSlice, register
from .llama import LlamaAdapter


def _qkv(part: int):
    # GPTNeoXAttention views its output as [..., heads, 3 * hd] and chunks the last dim into q|k|v, so weight
    # row r belongs to head r // (3 hd), part (r % (3 hd)) // hd: viewing [heads, 3, hd, in] exposes the parts.
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        weight = a.layer_param(layer, "attention.query_key_value.weight")  # [3 H, H]
        out = [ParamSlice(weight, (a.n_heads, 3, a.head_dim, a.hidden_size), (slice(None), part), None)]
        bias = a.layer_param(layer, "attention.query_key_value.bias")  # [3 H]
        if a.has_param(bias):
            out.append(ParamSlice(bias, (a.n_heads, 3, a.head_dim), (slice(None), part), None))
        return out

    return build


@register("GPTNeoXForCausalLM")
class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    layers_path = "gpt_neox.layers"
    final_norm_path = "gpt_neox.final_layer_norm"
    embedding_path = "gpt_neox.embed_in"
    lm_head_path = "lm_head"
    _components = {
        "attention.query": _qkv(0),
        "attention.key": _qkv(1),
        "attention.value": _qkv(2),
        "attention.output": lambda a, layer, expert: a.whole(layer, "attention.dense"),
        # dense_h_to_4h is [I, H] with bias [I]; dense_4h_to_h is [H, I] (its bias [H] has no neuron axis).
        "ffn.up": lambda a, layer, expert: a.whole(layer, "mlp.dense_h_to_4h", weight_axis=0, bias_axis=0),
        "ffn.down": lambda a, layer, expert: a.whole(layer, "mlp.dense_4h_to_h", weight_axis=1),
        "norm.attn_in": lambda a, layer, expert: a.whole(layer, "input_layernorm"),
        # Also with the parallel residual, post_attention_layernorm normalises the MLP's input.
        "norm.ffn_in": lambda a, layer, expert: a.whole(layer, "post_attention_layernorm"),
    }
    lacks = {**LlamaAdapter.lacks, "ffn.gate": "GELU MLP without a gate"}
