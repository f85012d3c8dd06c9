"""Phi (phi-1, phi-1.5, phi-2): parallel attention and MLP from ONE LayerNorm (with bias), `dense` output
projection, GELU MLP `fc1`/`fc2` without a gate, a final LayerNorm and an LM head with bias.

x -> input_layernorm -> (attention + MLP) + x: the single norm feeds both branches; it is `norm.attn_in`,
and `norm.ffn_in` is not applicable (perturbing it separately is impossible). Source: transformers 5.x
models/phi/modeling_phi.py (PhiDecoderLayer).
"""

from __future__ import annotations

from . import _layouts as L
from .base import Adapter, register


@register("PhiForCausalLM")
class PhiAdapter(Adapter):
    family = "phi"
    final_norm_path = "model.final_layernorm"
    aliases = {"norm.input": "norm.attn_in", "norm.post_attention": None}
    _components = {
        **L.separate_attention(o="dense"),
        "ffn.up": L.ffn_in("mlp.fc1"),
        "ffn.down": L.ffn_out("mlp.fc2"),
        "norm.attn_in": L.module("input_layernorm"),
    }
    lacks = {
        "attention.q_norm": "qk_layernorm is off in phi-1/1.5/2 configs (not mapped)",
        "attention.k_norm": "qk_layernorm is off in phi-1/1.5/2 configs (not mapped)",
        "ffn.gate": "GELU MLP without a gate",
        "norm.ffn_in": "parallel block: input_layernorm (norm.attn_in) feeds the MLP too",
        "norm.attn_out": "pre-norm only", "norm.ffn_out": "pre-norm only",
        "moe.router": "dense model", "moe.shared_expert": "dense model",
    }
