"""Falcon (the Falcon-7B layout): parallel attention and MLP from ONE LayerNorm, fused multi-query QKV.

FalconAttention._split_heads (multi_query, not new_decoder_architecture) views the fused output as
[heads + 2, head_dim]: rows 0 : heads·hd are the queries, the next hd the single key head, the last hd the
single value head. The MLP is dense_h_to_4h -> GELU -> dense_4h_to_h (no gate). The other Falcon layouts
(new_decoder_architecture with grouped QKV and ln_attn/ln_mlp; non-multi-query) are refused explicitly rather
than mapped wrongly. Source: transformers 5.x models/falcon/modeling_falcon.py.
"""

from __future__ import annotations

import torch

from . import _layouts as L
from .base import Adapter, ParamSlice, UnsupportedArchitecture, register


def _qkv(part: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        q_rows = a.n_heads * a.head_dim
        bounds = (0, q_rows, q_rows + a.head_dim, q_rows + 2 * a.head_dim)
        rows = slice(bounds[part], bounds[part + 1])
        out = [ParamSlice(a.layer_param(layer, "self_attention.query_key_value.weight"), None, (rows,), None)]
        bias = a.layer_param(layer, "self_attention.query_key_value.bias")
        if a.has_param(bias):
            out.append(ParamSlice(bias, None, (rows,), None))
        return out

    return build


@register("FalconForCausalLM")
class FalconAdapter(Adapter):
    family = "falcon"
    layers_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    embedding_path = "transformer.word_embeddings"
    aliases = {"norm.input": "norm.attn_in", "norm.post_attention": None}
    _components = {
        "attention.query": _qkv(0),
        "attention.key": _qkv(1),
        "attention.value": _qkv(2),
        "attention.output": L.module("self_attention.dense"),
        "ffn.up": L.ffn_in("mlp.dense_h_to_4h"),
        "ffn.down": L.ffn_out("mlp.dense_4h_to_h"),
        "norm.attn_in": L.module("input_layernorm"),
    }
    lacks = {
        "attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms",
        "ffn.gate": "GELU MLP without a gate",
        "norm.ffn_in": "parallel block: input_layernorm (norm.attn_in) feeds the MLP too",
        "norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only",
        "moe.router": "dense model", "moe.shared_expert": "dense model",
    }

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.new_decoder_architecture or not config.multi_query or not config.parallel_attn:
            raise UnsupportedArchitecture(
                f"{self.architecture}: only the Falcon-7B layout (multi_query, parallel_attn, one LayerNorm) is "
                "mapped; new_decoder_architecture / multi-head / sequential Falcon layouts need their own adapter"
            )
        self.n_kv_heads = 1  # multi-query: one key/value head whatever num_kv_heads says
        self.intermediate_size = int(config.ffn_hidden_size)
