"""YAML `adapter: <family>` for classes the registry cannot name, `experts:` and global components."""

import pathlib

import pytest
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from esa_pipeline.core.config import (
    ConfigError,
    load_experiment,
    model_plan,
    model_section_hash,
    select_experts,
)
from esa_pipeline.core.models.adapters import UnsupportedArchitecture, adapter_for
from esa_pipeline.core.models.byte_tokenizer import byte_tokenizer
from esa_pipeline.core.models.registry import load_model
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed
from esa_pipeline.defs.sweep_assets import sweep_specs

YAML = """\
protocol: smoke
datasets: [bundled]
window: 32
token_budget: 64
seeds: [1]
strengths: {{gaussian: [0.1]}}
components: [attention.query, ffn.down]
models:
{models}
"""


@pytest.fixture(scope="module")
def smollm3_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny SmolLM3 checkpoint: a class the registry does not name, with Llama's parameter layout."""
    path = tmp_path_factory.mktemp("smollm3")
    torch.manual_seed(0)
    config = SmolLM3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    SmolLM3ForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _load(tmp_path, models: str):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML.format(models=models))
    return load_experiment(path)


def _error(tmp_path, models: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, models)
    return str(info.value)


def test_an_unregistered_class_runs_with_a_matching_family(tmp_path, smollm3_dir):
    cfg = _load(tmp_path, f"  mine: {{source: {smollm3_dir}, adapter: llama}}")
    assert model_plan(cfg, "mine").adapter == "llama"
    lm = load_model(str(smollm3_dir), dtype="float32", device="cpu", adapter="llama")
    assert lm.spec.family == "llama" and lm.spec.architecture == "SmolLM3ForCausalLM"
    adapter = adapter_for(lm.model)  # the bound family serves every later lookup
    before = lm.model.model.layers[1].mlp.down_proj.weight.clone()
    with perturbed(lm.model, adapter, Perturbation("gaussian", "ffn.down", 1, 0.5, 3)) as report:
        assert report.n_changed == before.numel()
    assert torch.equal(lm.model.model.layers[1].mlp.down_proj.weight, before)


def test_without_adapter_the_error_says_how_to_name_a_family(tmp_path, smollm3_dir):
    message = _error(tmp_path, f"  mine: {{source: {smollm3_dir}}}")
    assert "SmolLM3ForCausalLM has no adapter" in message and "set models.mine.adapter: <family>" in message


def test_a_mismatching_family_lists_what_is_missing_and_the_families_tried(tmp_path, smollm3_dir):
    message = _error(tmp_path, f"  mine: {{source: {smollm3_dir}, adapter: gpt2}}")
    assert "models.mine.adapter: SmolLM3ForCausalLM does not have the gpt2 layout" in message
    assert "missing parameter transformer.h.0.attn.c_attn.weight" in message
    assert "Families tried:" in message
    # Families with Llama's parameter layout match; OLMo does not (its norms have no parameters).
    matching = message.split("matching: ")[1].split(".")[0].split(", ")
    assert "llama" in matching and "olmo" not in matching and "gpt2" not in matching
    assert "unknown family 'lama'" in _error(tmp_path, f"  mine: {{source: {smollm3_dir}, adapter: lama}}")
    with pytest.raises(UnsupportedArchitecture, match="does not have the phi layout"):
        load_model(str(smollm3_dir), dtype="float32", device="cpu", adapter="phi")


def test_expert_selection_is_validated_against_the_model(tmp_path):
    assert select_experts("all", 4) == [None] and select_experts("each", 4) == [0, 1, 2, 3]
    assert select_experts([3, 0], 4) == [0, 3]
    assert "needs a mixture-of-experts model" in _error(tmp_path, "  tiny-llama: {experts: each}")
    assert "experts [9] do not exist in a model with 4 experts" in _error(
        tmp_path, "  tiny-qwen2-moe: {experts: [0, 9]}")


def test_per_expert_sweeps_repeat_points_on_expert_components_only(tmp_path):
    cfg = _load(tmp_path, "  tiny-olmoe: {experts: [0, 3]}")
    plan = model_plan(cfg, "tiny-olmoe")
    specs = sweep_specs(plan, "ffn.down", 1, [0, 1], select_experts(plan.experts, 4))
    assert [(p.layer, p.expert) for p in specs] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    assert [p.expert for p in sweep_specs(plan, "attention.query", 1, [0], [0, 3])] == [None]
    # A section that does not use the new keys keeps the hash it had before they existed.
    assert model_section_hash(_load(tmp_path, "  tiny-olmoe: {}"), "tiny-olmoe") != model_section_hash(
        cfg, "tiny-olmoe")


def test_global_components_and_new_roles_are_accepted_from_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML.format(models="  tiny-gemma3: {components: [embedding, norm.final, lm_head, "
                                       "attention.q_norm, norm.ffn_out, norm.post_attention]}"))
    plan = model_plan(load_experiment(path), "tiny-gemma3")
    assert plan.kinds_for("attention.q_norm") == ["gaussian"]  # no scale strengths in this file
    message = _error(tmp_path, "  tiny-olmo: {components: [norm.final]}")
    assert "'norm.final' is not applicable to OlmoForCausalLM" in message
