"""GPT-2: `Conv1D` modules store weights as [in, out] (the transpose of nn.Linear).

attn.c_attn weight [H, 3H] / bias [3H]: its output splits into Q|K|V along the LAST dim (columns), so
query = columns 0:H, key = H:2H, value = 2H:3H. mlp.c_fc [H, I]: neurons are COLUMNS (and bias entries);
mlp.c_proj [I, H]: neurons are ROWS. ln_1 feeds attention, ln_2 the MLP, ln_f is final; wte is tied to the
head. The learned position embedding `wpe` has no role. Source: transformers 5.x models/gpt2/modeling_gpt2.py
and pytorch_utils.Conv1D (addmm(bias, x, weight)).
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, ParamSlice, register


def _c_attn(part: int):
    def build(a: Adapter, layer: int, expert: int | None) -> list[ParamSlice]:
        cols = slice(part * a.hidden_size, (part + 1) * a.hidden_size)
        return [ParamSlice(a.layer_param(layer, "attn.c_attn.weight"), None, (slice(None), cols), None),
                ParamSlice(a.layer_param(layer, "attn.c_attn.bias"), None, (cols,), None)]

    return build


@register("GPT2LMHeadModel")
class GPT2Adapter(Adapter):
    family = "gpt2"
    layers_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    embedding_path = "transformer.wte"
    aliases = {"norm.input": "norm.attn_in", "norm.post_attention": None}
    unmapped = ("transformer.wpe.weight",)  # learned position embedding: no role
    _components = {
        "attention.query": _c_attn(0),
        "attention.key": _c_attn(1),
        "attention.value": _c_attn(2),
        "attention.output": L.module("attn.c_proj"),
        "ffn.up": L.module("mlp.c_fc", weight_axis=1, bias_axis=0),  # Conv1D [H, I]
        "ffn.down": L.module("mlp.c_proj", weight_axis=0),  # Conv1D [I, H]
        "norm.attn_in": L.module("ln_1"),
        "norm.ffn_in": L.module("ln_2"),
    }
    lacks = {
        "attention.q_norm": "no query/key norms", "attention.k_norm": "no query/key norms",
        "ffn.gate": "GELU MLP without a gate", "norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only",
        "moe.router": "dense model", "moe.shared_expert": "dense model",
    }
