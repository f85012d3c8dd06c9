"""Tiny random-weight models of every adapter family beyond the original five (plumbing only, never science).

Each builder makes a 4-layer, hidden-64 model over the byte vocabulary with the family's real module layout
and the options that matter for the adapter (GQA, biases, sandwich norms, soft-capping, multipliers,
experts). Norm gains get seeded noise (`jitter_norms`): Gemma's zero-initialised (1 + w) gains and unit
LayerNorms would otherwise make gain tests blind. Builders run inside `registry._load_tiny`'s seeded RNG.
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers import PreTrainedModel

from .byte_tokenizer import BYTE_VOCAB_SIZE

_COMMON = dict(
    vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=2048, bos_token_id=256, eos_token_id=257, pad_token_id=258,
)
_GQA = dict(num_key_value_heads=2)


def jitter_norms(model: torch.nn.Module, sigma: float = 0.1) -> None:
    """Add N(0, sigma) to every 1-D weight (the norm gains) so that gain perturbations are visible."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and param.ndim == 1:
                param.add_(torch.randn_like(param) * sigma)


def _qwen2() -> PreTrainedModel:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, **_GQA))  # q/k/v biases


def _qwen3() -> PreTrainedModel:
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, **_GQA, head_dim=16))


def _gemma() -> PreTrainedModel:
    return tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, **_GQA, head_dim=16))


def _gemma2() -> PreTrainedModel:
    config = tf.Gemma2Config(**_COMMON, **_GQA, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                             final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    return tf.Gemma2ForCausalLM(config)  # a low cap so that soft-capping visibly changes the logits


def _gemma3() -> PreTrainedModel:
    # Like gemma-3-270m: 1 KV head, q/k norms, sliding and full layers (here alternating, window 8).
    config = tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                 query_pre_attn_scalar=16, sliding_window_pattern=2)
    return tf.Gemma3ForCausalLM(config)


def _olmo() -> PreTrainedModel:
    return tf.OlmoForCausalLM(tf.OlmoConfig(**_COMMON, **_GQA, clip_qkv=8.0))


def _olmo2() -> PreTrainedModel:
    return tf.Olmo2ForCausalLM(tf.Olmo2Config(**_COMMON, **_GQA))


def _phi() -> PreTrainedModel:
    config = tf.PhiConfig(**{**_COMMON, "intermediate_size": 256}, partial_rotary_factor=0.5)
    return tf.PhiForCausalLM(config)


def _gpt2() -> PreTrainedModel:
    config = tf.GPT2Config(vocab_size=BYTE_VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, n_positions=2048,
                           bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return tf.GPT2LMHeadModel(config)


def _stablelm() -> PreTrainedModel:
    return tf.StableLmForCausalLM(tf.StableLmConfig(**_COMMON, **_GQA, use_qkv_bias=True,
                                                    partial_rotary_factor=0.25))


def _granite() -> PreTrainedModel:
    config = tf.GraniteConfig(**_COMMON, **_GQA, embedding_multiplier=2.0, residual_multiplier=0.5,
                              attention_multiplier=0.2, logits_scaling=4.0, tie_word_embeddings=True)
    return tf.GraniteForCausalLM(config)


def _starcoder2() -> PreTrainedModel:
    return tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_COMMON, **_GQA, sliding_window=8))


def _falcon() -> PreTrainedModel:
    config = tf.FalconConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             multi_query=True, parallel_attn=True, bias=True, bos_token_id=256, eos_token_id=257,
                             pad_token_id=258)
    return tf.FalconForCausalLM(config)  # the Falcon-7B layout: fused multi-query QKV, parallel block


def _gpt_oss() -> PreTrainedModel:
    config = tf.GptOssConfig(**{**_COMMON, "intermediate_size": 32}, **_GQA, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=8)
    model = tf.GptOssForCausalLM(config)
    with torch.no_grad():  # expert/router biases and sinks start at zero: make them visible to slice tests
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "router.bias", "sinks")):
                param.normal_(0.0, 0.02)
    return model


def _qwen2_moe() -> PreTrainedModel:
    config = tf.Qwen2MoeConfig(**_COMMON, **_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=96, decoder_sparse_step=1)
    return tf.Qwen2MoeForCausalLM(config)


def _qwen3_moe() -> PreTrainedModel:
    config = tf.Qwen3MoeConfig(**_COMMON, **_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, decoder_sparse_step=1)
    return tf.Qwen3MoeForCausalLM(config)


def _olmoe() -> PreTrainedModel:
    config = tf.OlmoeConfig(**{**_COMMON, "intermediate_size": 32}, **_GQA, num_experts=4, num_experts_per_tok=2)
    return tf.OlmoeForCausalLM(config)


# registry name -> builder; every one is jittered (see module docstring)
TINY_BUILDERS = {
    "tiny-qwen2": _qwen2,
    "tiny-qwen3": _qwen3,
    "tiny-gemma": _gemma,
    "tiny-gemma2": _gemma2,
    "tiny-gemma3": _gemma3,
    "tiny-olmo": _olmo,
    "tiny-olmo2": _olmo2,
    "tiny-phi": _phi,
    "tiny-gpt2": _gpt2,
    "tiny-stablelm": _stablelm,
    "tiny-granite": _granite,
    "tiny-starcoder2": _starcoder2,
    "tiny-qwen2-moe": _qwen2_moe,
    "tiny-qwen3-moe": _qwen3_moe,
    "tiny-olmoe": _olmoe,
    "tiny-falcon": _falcon,
    "tiny-gpt-oss": _gpt_oss,
}
