"""Adapters map canonical components to the parameter regions the model really uses for them."""

import copy

import pytest
import torch

from esa_pipeline.core.models.adapters import (
    ComponentNotApplicable,
    UnsupportedArchitecture,
    adapter_for,
    supported_architectures,
)

MIDDLE = 2  # tiny models have 4 layers


def _logits_with_zeroed(lm, adapter, zeroed: list[tuple[str, int | None, bool]]) -> torch.Tensor:
    """Logits of a copy of the model with the given (component, expert, weights_only) slices zeroed."""
    model = copy.deepcopy(lm.model)
    for component, expert, weights_only in zeroed:
        slices = adapter.slices(component, MIDDLE, expert)
        for s in slices[:1] if weights_only else slices:
            s.get(model).zero_()
    ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        return model(ids).logits


def _marked(model, adapter, component, layer, expert=None) -> dict[str, torch.Tensor]:
    """name -> bool mask of the raw parameter elements covered by the component's slices."""
    marks = {}
    for s in adapter.slices(component, layer, expert):
        param = model.get_parameter(s.param_name)
        mask = marks.setdefault(s.param_name, torch.zeros(param.shape, dtype=torch.bool))
        view = mask.view(s.view_shape) if s.view_shape else mask
        view[s.index] = True
    return marks


def test_registry_serves_the_five_families():
    assert set(supported_architectures()) >= {
        "LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM", "MixtralForCausalLM"}


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        adapter_for(torch.nn.Linear(2, 2))


def test_value_and_query_key_slices_are_what_attention_uses(tiny_model):
    """Zeroing V equals zeroing the output projection's weight; zeroing Q equals zeroing K (uniform
    attention). Both would fail if a fused tensor were split at the wrong rows."""
    lm, adapter = tiny_model, adapter_for(tiny_model.model)
    baseline = _logits_with_zeroed(lm, adapter, [])
    no_value = _logits_with_zeroed(lm, adapter, [("attention.value", None, False)])
    no_output = _logits_with_zeroed(lm, adapter, [("attention.output", None, True)])
    no_query = _logits_with_zeroed(lm, adapter, [("attention.query", None, False)])
    no_key = _logits_with_zeroed(lm, adapter, [("attention.key", None, False)])
    assert not torch.allclose(no_value, baseline)
    torch.testing.assert_close(no_value, no_output, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(no_query, baseline)
    torch.testing.assert_close(no_query, no_key, rtol=1e-5, atol=1e-6)


def test_ffn_slices_are_what_the_mlp_uses(tiny_model):
    """Zeroing the input side of the MLP (gate or up, with bias) equals zeroing the down weight."""
    lm, adapter = tiny_model, adapter_for(tiny_model.model)
    no_down = _logits_with_zeroed(lm, adapter, [("ffn.down", None, True)])
    assert not torch.allclose(no_down, _logits_with_zeroed(lm, adapter, []))
    for component in [c for c in ("ffn.gate", "ffn.up") if c in adapter.components()]:
        torch.testing.assert_close(_logits_with_zeroed(lm, adapter, [(component, None, False)]), no_down,
                                   rtol=1e-5, atol=1e-6)


def test_mixtral_expert_slices_address_one_expert(tiny):
    lm = tiny("tiny-mixtral")
    adapter = adapter_for(lm.model)
    for component in ("ffn.gate", "ffn.up"):
        torch.testing.assert_close(_logits_with_zeroed(lm, adapter, [(component, 2, False)]),
                                   _logits_with_zeroed(lm, adapter, [("ffn.down", 2, False)]))
    assert not torch.allclose(_logits_with_zeroed(lm, adapter, [("ffn.down", 2, False)]),
                              _logits_with_zeroed(lm, adapter, [("ffn.down", 1, False)]))
    intermediate = lm.model.config.intermediate_size
    marks = _marked(lm.model, adapter, "ffn.up", MIDDLE, expert=2)
    expected = torch.zeros(4, 2 * intermediate, 64, dtype=torch.bool)
    expected[2, intermediate:] = True
    assert list(marks) == [f"model.layers.{MIDDLE}.mlp.experts.gate_up_proj"]
    assert torch.equal(marks[f"model.layers.{MIDDLE}.mlp.experts.gate_up_proj"], expected)
    all_experts = _marked(lm.model, adapter, "ffn.down", MIDDLE)  # expert=None: every expert
    assert all_experts[f"model.layers.{MIDDLE}.mlp.experts.down_proj"].all()


def test_pythia_key_is_the_middle_third_of_every_head(tiny):
    lm = tiny("tiny-pythia")
    adapter = adapter_for(lm.model)
    marks = _marked(lm.model, adapter, "attention.key", MIDDLE)
    prefix = f"gpt_neox.layers.{MIDDLE}.attention.query_key_value"
    head_dim = 16  # hidden 64 / 4 heads; row r -> head r // (3 hd), part (r % (3 hd)) // hd
    rows = torch.tensor([(r % (3 * head_dim)) // head_dim == 1 for r in range(3 * 64)])
    assert set(marks) == {f"{prefix}.weight", f"{prefix}.bias"}
    assert torch.equal(marks[f"{prefix}.bias"], rows)
    assert torch.equal(marks[f"{prefix}.weight"], rows[:, None].expand(-1, 64))


def test_phi3_fused_rows_follow_head_counts(tiny):
    lm = tiny("tiny-phi3")  # 4 query heads, 2 kv heads, head_dim 16: Q rows 0..63, K 64..95, V 96..127
    adapter = adapter_for(lm.model)
    name = f"model.layers.{MIDDLE}.self_attn.qkv_proj.weight"
    for component, (start, stop) in {"attention.query": (0, 64), "attention.key": (64, 96),
                                     "attention.value": (96, 128)}.items():
        rows = _marked(lm.model, adapter, component, MIDDLE)[name].all(dim=1)
        assert rows.nonzero().flatten().tolist() == list(range(start, stop)), component
    gate_rows = _marked(lm.model, adapter, "ffn.gate", MIDDLE)[f"model.layers.{MIDDLE}.mlp.gate_up_proj.weight"]
    assert gate_rows.all(dim=1).nonzero().flatten().tolist() == list(range(128))


def test_missing_components_are_explicitly_not_applicable(tiny):
    pythia = adapter_for(tiny("tiny-pythia").model)
    assert "ffn.gate" not in pythia.components() and "moe.router" not in pythia.components()
    with pytest.raises(ComponentNotApplicable, match="ffn.gate is not applicable to GPTNeoXForCausalLM"):
        pythia.slices("ffn.gate", MIDDLE)
    llama = adapter_for(tiny("tiny-llama").model)
    with pytest.raises(ComponentNotApplicable, match="moe.router is not applicable to LlamaForCausalLM"):
        llama.slices("moe.router", MIDDLE)
    assert "moe.router" in adapter_for(tiny("tiny-mixtral").model).components()


@pytest.mark.parametrize(
    ("component", "layer", "expert", "match"),
    [("attention.qkv", 1, None, "unknown component"), ("ffn.down", 4, None, r"out of range.*0\.\.3"),
     ("ffn.down", None, None, "needs an integer layer"), ("ffn.down", 1, 0, "not a mixture of experts"),
     ("embedding", 1, None, "layer=None")],
)
def test_bad_addresses_raise_with_a_fix(tiny, component, layer, expert, match):
    adapter = adapter_for(tiny("tiny-llama").model)
    with pytest.raises(ValueError, match=match):
        adapter.slices(component, layer, expert)


def test_slices_are_writable_views_and_accessors_find_modules(tiny_model):
    model, adapter = tiny_model.model, adapter_for(tiny_model.model)
    for component in adapter.components():
        for s in adapter.slices(component, MIDDLE):
            view = s.get(model)
            param = model.get_parameter(s.param_name)
            storage = param.untyped_storage()
            assert view.untyped_storage().data_ptr() == storage.data_ptr(), (component, s)
    assert len(adapter.decoder_layers(model)) == adapter.num_layers == 4
    assert adapter.embedding(model) is model.get_input_embeddings()
    assert adapter.lm_head(model) is model.get_output_embeddings()
    hidden = torch.zeros(1, 3, 64)
    assert adapter.final_norm(model)(hidden).shape == hidden.shape
    router = adapter.router(model, MIDDLE)
    if adapter.n_experts:
        assert router(hidden)[0].shape == (3, adapter.n_experts)  # router logits per token
    else:
        assert router is None


def test_final_norm_then_head_logits_reproduce_the_models_logits(tiny_model):
    """The evaluator computes logits as head_logits(final_norm(h)); it must equal the model's own logits."""
    model, adapter = tiny_model.model, adapter_for(tiny_model.model)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        normed = out.hidden_states[-1]  # HF's last hidden state is already after the final norm
        logits = adapter.head_logits(model, normed)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
