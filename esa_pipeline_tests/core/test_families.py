"""Every adapter family, checked against the module's own forward semantics on its tiny random model.

Roles are checked by what the forward pass does with them (the attention-input norm's output IS attention's
input; the attention-output norm's input IS attention's output, ...), not by attribute names; slices by
equivalences that only hold when they cover exactly the right elements (zeroing one value head equals
removing that head's features before the output projection).
"""

import copy

import pytest
import torch

from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.models.adapters import (
    CANONICAL_COMPONENTS,
    GLOBAL_COMPONENTS,
    LAYER_COMPONENTS,
    Adapter,
    ComponentNotApplicable,
    adapter_class,
    adapter_for,
    role_of,
    supported_architectures,
)
from esa_pipeline.core.models.adapters.base import register
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed
from esa_pipeline_tests.conftest import ALL_TINY
from esa_pipeline_tests.core.test_prefix_cache import assert_cached_equals_full, small_base

MIDDLE = 2
IDS = torch.tensor([list(b"The quick brown fox jumps over the lazy dog, twice.")])
NORM_ROLES = ("norm.attn_in", "norm.attn_out", "norm.ffn_in", "norm.ffn_out")


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _block(adapter: Adapter, component: str, depth: int) -> str:
    """The submodule `depth` levels above the first slice's parameter (e.g. attention from its output proj)."""
    name = adapter.slices(component, MIDDLE)[0].param_name
    return name.rsplit(".", depth + 1)[0]


def test_every_registered_family_declares_every_role_with_a_reason():
    for architecture in supported_architectures():
        cls = adapter_class(architecture)
        lacking = cls.not_applicable()
        assert all(reason.strip() for reason in lacking.values()), architecture
        roles = set(cls.layer_roles()) | set(cls.global_roles())
        assert roles | set(lacking) == set(CANONICAL_COMPONENTS) and not roles & set(lacking), architecture


def test_a_family_that_forgets_a_role_is_refused():
    with pytest.raises(TypeError, match="neither built nor lacking"):
        @register()
        class Forgetful(Adapter):  # noqa: F841
            family = "forgetful"
            _components = {"attention.query": lambda a, layer, expert: []}


@pytest.mark.parametrize("name", ALL_TINY)
def test_norm_roles_are_what_the_forward_pass_does(tiny, name):
    """attn_in's output is attention's input; attn_out's input is attention's output; same for the MLP."""
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    attention = _block(adapter, "attention.output", 1)  # parent of the output projection
    mlp = _block(adapter, "ffn.down", 1)  # mlp.down_proj.weight and mlp.experts.down_proj alike
    seen: dict[str, tuple] = {}

    def keep(key):
        def hook(module, args, kwargs, output):
            first = args[0] if args else next(iter(kwargs.values()))
            seen[key] = (first, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [model.get_submodule(attention).register_forward_hook(keep("attention"), with_kwargs=True),
               model.get_submodule(mlp).register_forward_hook(keep("mlp"), with_kwargs=True)]
    roles = [r for r in NORM_ROLES if r in adapter.components()]
    for role in roles:
        handles.append(model.get_submodule(_module_of(adapter.slices(role, MIDDLE)[0].param_name))
                       .register_forward_hook(keep(role), with_kwargs=True))
    _logits(model)
    for handle in handles:
        handle.remove()
    expected = {"norm.attn_in": ("attention", 0, 1), "norm.attn_out": ("attention", 1, 0),
                "norm.ffn_in": ("mlp", 0, 1), "norm.ffn_out": ("mlp", 1, 0)}
    for role in roles:
        block, block_side, norm_side = expected[role]
        torch.testing.assert_close(seen[role][norm_side].reshape(-1), seen[block][block_side].reshape(-1),
                                   msg=f"{name}: {role}")
    assert roles or name == "tiny-olmo", f"{name} maps no norm role"  # OLMo's norms have no parameters


@pytest.mark.parametrize("name", ALL_TINY)
def test_zeroing_one_value_head_removes_exactly_that_heads_features(tiny, name):
    """Zeroing kv head g's value rows (weights and bias) equals zeroing, at the output projection's input,
    the features of every query head that reads kv head g — and differs from the baseline."""
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    g, hd = adapter.n_kv_heads - 1, adapter.head_dim
    group = adapter.n_heads // adapter.n_kv_heads
    zeroed = copy.deepcopy(model)
    for s in adapter.slices("attention.value", MIDDLE):
        view = s.get(zeroed)
        conv1d = type(zeroed.get_submodule(_module_of(s.param_name))).__name__ == "Conv1D"
        if view.dim() == 3 or (view.dim() == 2 and s.view_shape is not None):  # GPT-NeoX [heads, hd, (in)]
            view[g] = 0
        elif view.dim() == 2 and conv1d:  # GPT-2 Conv1D [in, out]: output features are columns
            view[:, g * hd:(g + 1) * hd] = 0
        else:  # [out, in] weight rows or [out] bias
            view[g * hd:(g + 1) * hd] = 0
    output = model.get_submodule(_module_of(adapter.slices("attention.output", MIDDLE)[0].param_name))
    heads = range(g * group, (g + 1) * group)

    def drop(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * hd:(h + 1) * hd] = 0
        return (x, *args[1:])

    handle = output.register_forward_pre_hook(drop)
    expected = _logits(model)
    handle.remove()
    torch.testing.assert_close(_logits(zeroed), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _logits(model))


@pytest.mark.parametrize("name", ALL_TINY)
def test_query_and_mlp_input_slices_are_what_the_forward_uses(tiny, name):
    """Zeroing Q equals zeroing K (uniform attention either way); zeroing the MLP's input side (one expert
    of an MoE) equals zeroing its down projection."""
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    expert = 1 if adapter.n_experts else None

    def zeroed(component, weights_only=False, expert=None):
        copy_ = copy.deepcopy(model)
        slices = adapter.slices(component, MIDDLE, expert)
        for s in slices[:1] if weights_only else slices:
            s.get(copy_).zero_()
        return _logits(copy_)

    torch.testing.assert_close(zeroed("attention.query"), zeroed("attention.key"), rtol=1e-5, atol=1e-5)
    no_down = zeroed("ffn.down", weights_only=True, expert=expert)
    assert not torch.allclose(no_down, _logits(model))
    # GPT-OSS computes (up + 1) * glu(gate): a zero up projection does not silence the MLP, a zero gate does.
    inputs = ("ffn.gate",) if name == "tiny-gpt-oss" else ("ffn.gate", "ffn.up")
    for component in [c for c in inputs if c in adapter.components()]:
        torch.testing.assert_close(zeroed(component, expert=expert), no_down, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_TINY)
def test_prefix_cache_and_head_logits_reproduce_the_models_own_logits(tiny, name):
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        torch.testing.assert_close(adapter.head_logits(model, out.hidden_states[-1]), out.logits, rtol=0, atol=1e-5)
    base = small_base(lm, 96, window=48)
    cache = PrefixCache.build(lm, base, adapter)
    assert cache.enabled, cache.reason
    assert_cached_equals_full(lm, base, cache, Perturbation("gaussian", "attention.value", MIDDLE, 0.5, 1337))


@pytest.mark.parametrize("name", ALL_TINY)
def test_every_parameter_is_mapped_and_every_slice_has_the_configs_shape(tiny, name):
    assert adapter_for(tiny(name).model).layout_problems() == []


@pytest.mark.parametrize("name", ALL_TINY)
def test_every_component_restores_bit_exactly(tiny, name):
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for component in adapter.component_names():
        layer = None if adapter.role_of(component) in GLOBAL_COMPONENTS else MIDDLE
        with perturbed(model, adapter, Perturbation("gaussian", component, layer, 0.5, 7)) as report:
            assert report.n_changed > 0, (name, component)
        assert report.restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_gemma_gain_factor_multiplies_one_plus_w(tiny, name):
    """GemmaRMSNorm computes x̂ · (1 + w): a factor 0.9 must make that 0.9 · x̂ · (1 + w)."""
    lm = tiny(name)
    model, adapter = lm.model, adapter_for(lm.model)
    role = "norm.attn_in"
    (s,) = adapter.slices(role, MIDDLE)
    assert s.gain_offset == 1.0
    w = s.get(model).clone()
    norm = model.get_submodule(_module_of(s.param_name))
    handle = norm.register_forward_hook(lambda module, args, output: output * 0.9)
    expected = _logits(model)
    handle.remove()
    with perturbed(model, adapter, Perturbation("scale", role, MIDDLE, 0.9, 0)):
        torch.testing.assert_close(s.get(model), (1 + w) * 0.9 - 1)
        torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(s.get(model), w)


def test_old_names_are_aliases_resolved_per_family(tiny):
    llama, gemma2, olmo2 = (adapter_for(tiny(n).model) for n in ("tiny-llama", "tiny-gemma2", "tiny-olmo2"))
    assert llama.slices("norm.post_attention", 1) == llama.slices("norm.ffn_in", 1)
    assert gemma2.slices("norm.post_attention", 1) == gemma2.slices("norm.attn_out", 1)
    assert llama.slices("norm.input", 1) == llama.slices("norm.attn_in", 1)
    with pytest.raises(ComponentNotApplicable, match="norm.input is not applicable"):
        olmo2.slices("norm.input", 1)
    assert role_of("norm.post_attention", "llama") == "norm.ffn_in"
    assert role_of("norm.post_attention", "gemma2") == "norm.attn_out"
    assert role_of("norm.post_attention", "some-unknown-family") == "norm.ffn_in"
    assert role_of("ffn.down", "gemma2") == "ffn.down"


def test_olmo_norms_are_not_applicable_with_the_reason(tiny):
    adapter = adapter_for(tiny("tiny-olmo").model)
    for role in ("norm.attn_in", "norm.ffn_in", "norm.final"):
        with pytest.raises(ComponentNotApplicable, match="non-parametric"):
            adapter.slices(role, None if role == "norm.final" else 1)
    assert "norm.final" not in adapter.component_names()


def test_tied_embedding_and_head_are_one_tensor_and_the_report_says_so(tiny):
    lm = tiny("tiny-gemma3")
    adapter = adapter_for(lm.model)
    assert adapter.tied_embeddings
    assert adapter.slices("lm_head", None)[0].get(lm.model).data_ptr() == \
        adapter.slices("embedding", None)[0].get(lm.model).data_ptr()
    with perturbed(lm.model, adapter, Perturbation("gaussian", "lm_head", None, 0.1, 1)) as report:
        assert any("tied embeddings" in note for note in report.notes)


def test_gpt_oss_gate_and_up_are_interleaved_columns(tiny):
    lm = tiny("tiny-gpt-oss")
    adapter = adapter_for(lm.model)
    prefix = f"model.layers.{MIDDLE}.mlp.experts"
    for component, first in (("ffn.gate", 0), ("ffn.up", 1)):
        weight, bias = adapter.slices(component, MIDDLE, expert=2)
        full = lm.model.get_parameter(f"{prefix}.gate_up_proj")[2]  # [H, 2I]
        assert torch.equal(weight.get(lm.model), full[:, first::2]) and weight.neuron_axis == 1
        assert torch.equal(bias.get(lm.model), lm.model.get_parameter(f"{prefix}.gate_up_proj_bias")[2, first::2])
    # the module's own gating reads gate from the even and up from the odd columns: with up zeroed it is glu(gate)
    experts = lm.model.model.layers[MIDDLE].mlp.experts
    gate_up = torch.randn(3, experts.gate_up_proj.shape[-1])
    up_zeroed = gate_up.clone()
    up_zeroed[:, 1::2] = 0
    gate = gate_up[:, 0::2].clamp(max=experts.limit)
    torch.testing.assert_close(experts._apply_gate(up_zeroed), gate * torch.sigmoid(gate * experts.alpha))


def test_sweep_rows_name_the_tied_partner(tiny):
    from esa_pipeline.core.evaluation.sweep import run_sweep

    lm = tiny("tiny-gemma3")
    base = small_base(lm, 48, window=24)
    specs = [Perturbation("gaussian", c, None, 0.1, 1) for c in ("embedding", "lm_head", "norm.final")]
    rows, _ = run_sweep(lm, base, specs)
    assert rows.set_index("component")["also_perturbed"].to_dict() == {
        "embedding": "lm_head", "lm_head": "embedding", "norm.final": None}
    assert rows["restored"].all() and (rows["delta_nll"] != 0).all()


def test_gpt2_query_is_the_first_third_of_c_attn_columns(tiny):
    lm = tiny("tiny-gpt2")
    adapter = adapter_for(lm.model)
    weight, bias = adapter.slices("attention.query", MIDDLE)
    assert (weight.param_name, weight.index) == (f"transformer.h.{MIDDLE}.attn.c_attn.weight",
                                                  (slice(None), slice(0, 64)))
    assert weight.get(lm.model).shape == (64, 64) and bias.get(lm.model).shape == (64,)
    up = adapter.slices("ffn.up", MIDDLE)
    assert [s.neuron_axis for s in up] == [1, 0]  # Conv1D [H, I]: neurons are columns


@pytest.mark.parametrize(("name", "experts", "top_k", "shared", "expert_numel"), [
    ("tiny-qwen2-moe", 4, 2, 1, 4 * (4 * 2 * 32 * 64 + 4 * 64 * 32)),
    ("tiny-qwen3-moe", 4, 2, 0, 4 * (4 * 2 * 32 * 64 + 4 * 64 * 32)),
    ("tiny-olmoe", 4, 2, 0, 4 * (4 * 2 * 32 * 64 + 4 * 64 * 32)),
    ("tiny-mixtral", 4, 2, None, 4 * (4 * 2 * 128 * 64 + 4 * 64 * 128)),
    ("tiny-gpt-oss", 4, 2, 0, 4 * (4 * 64 * 2 * 32 + 4 * 2 * 32 + 4 * 32 * 64 + 4 * 64)),  # biased experts
    ("tiny-gemma3", None, None, None, 0),
])
def test_model_card_counts_experts_and_active_parameters(tiny, name, experts, top_k, shared, expert_numel):
    spec = tiny(name).spec
    if name == "tiny-mixtral":
        shared = 0
    assert (spec.n_experts, spec.experts_per_token, spec.n_shared_experts) == (experts, top_k, shared)
    assert spec.is_moe == bool(experts)
    active = spec.params_total - expert_numel + (expert_numel * top_k // experts if experts else 0)
    assert spec.params_active == active


def test_gemma2_soft_capping_bounds_logits_and_granite_scales_them(tiny):
    gemma2 = tiny("tiny-gemma2")
    logits = _logits(gemma2.model)
    assert logits.abs().max() <= gemma2.model.config.final_logit_softcapping
    granite = tiny("tiny-granite")
    adapter = adapter_for(granite.model)
    with torch.no_grad():
        out = granite.model(IDS, output_hidden_states=True)
        raw = adapter.lm_head(granite.model)(out.hidden_states[-1])
    torch.testing.assert_close(out.logits, raw / 4.0)


def test_layer_roles_cover_the_canonical_list():
    assert set(LAYER_COMPONENTS) | set(GLOBAL_COMPONENTS) == set(CANONICAL_COMPONENTS)
