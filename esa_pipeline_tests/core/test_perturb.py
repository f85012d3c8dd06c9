"""Perturbations touch exactly the intended elements, are reproducible from the spec alone, and restore
every parameter bit for bit (also when the body of the with-block raises)."""

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed, resolve_slices

MIDDLE = 2


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed_masks(model, before) -> dict[str, torch.Tensor]:
    """name -> bool mask of elements whose stored bits differ from `before` (only params that changed)."""
    masks = {name: _bits(p.detach()) != _bits(before[name]) for name, p in model.named_parameters()}
    return {name: m for name, m in masks.items() if m.any()}


def _value_changed(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Numerically different (a sign flip of 0.0 changes bits, not the value)."""
    a, b = after.detach().float(), before.float()
    return ~((a == b) | (a.isnan() & b.isnan()))


def _assert_bit_identical(model, before) -> None:
    assert _changed_masks(model, before) == {}, "weights differ after the with-block"


def _allowed_masks(model, adapter, spec) -> dict[str, torch.Tensor]:
    allowed = {}
    for s in resolve_slices(adapter, spec):
        param = model.get_parameter(s.param_name)
        mask = allowed.setdefault(s.param_name, torch.zeros(param.shape, dtype=torch.bool))
        (mask.view(s.view_shape) if s.view_shape else mask)[s.index] = True
    return allowed


def _specs_for(adapter) -> list[Perturbation]:
    specs = []
    for component in adapter.components():
        specs.append(Perturbation("gaussian", component, MIDDLE, 0.1, 0))
        specs.append(Perturbation("sign_flip", component, MIDDLE, 0.2, 0))
        if component.startswith("ffn."):
            specs.append(Perturbation("neurons", component, MIDDLE, 0.25, 0))
            specs.append(Perturbation("neurons", component, MIDDLE, 0.5, 0, mode="zero"))
        if component.startswith("norm."):
            specs.append(Perturbation("scale", component, MIDDLE, 1.1, 0))
        if component == "moe.router":
            specs.append(Perturbation("router", component, MIDDLE, 0.1, 0))
    specs.append(Perturbation("zero", "attention.value", MIDDLE, 0.3, 0))
    specs.append(Perturbation("bit_flip", "attention.output", MIDDLE, 0.01, 0))
    specs.append(Perturbation("gaussian", "embedding", None, 0.1, 0))
    return specs


def test_every_component_changes_only_its_elements_and_restores(tiny_model):
    model, adapter = tiny_model.model, adapter_for(tiny_model.model)
    before = _snapshot(model)
    for spec in _specs_for(adapter):
        with perturbed(model, adapter, spec) as report:
            changed = _changed_masks(model, before)
            allowed = _allowed_masks(model, adapter, spec)
            assert changed, spec
            for name, mask in changed.items():
                assert name in allowed and not (mask & ~allowed[name]).any(), (spec, name)
            value_changed = {n: _value_changed(model.get_parameter(n), before[n]) for n in changed}
            assert report.n_changed == sum(int(m.sum()) for m in value_changed.values()), spec
            assert report.n_elements == sum(int(m.sum()) for m in allowed.values()), spec
            assert report.restored is None
        assert report.restored is True, spec
        _assert_bit_identical(model, before)


def test_gaussian_fp32_changes_every_slice_element_by_sigma(tiny):
    model = tiny("tiny-llama").model
    adapter = adapter_for(model)
    with perturbed(model, adapter, Perturbation("gaussian", "ffn.down", MIDDLE, 0.1, 0)) as report:
        pass
    assert report.changed_fraction == 1.0
    assert report.relative_change == pytest.approx(0.1, rel=0.05)  # 8192 draws of N(0, 1)


def test_pythia_key_changes_exactly_the_key_rows_of_every_head_and_bias(tiny):
    model = tiny("tiny-pythia").model
    adapter, before = adapter_for(model), _snapshot(model)
    prefix = f"gpt_neox.layers.{MIDDLE}.attention.query_key_value"
    key_rows = torch.tensor([(r % 48) // 16 == 1 for r in range(192)])  # head_dim 16, [q|k|v] per head
    with perturbed(model, adapter, Perturbation("gaussian", "attention.key", MIDDLE, 0.1, 0)):
        changed = _changed_masks(model, before)
    assert set(changed) == {f"{prefix}.weight", f"{prefix}.bias"}
    assert torch.equal(changed[f"{prefix}.weight"].any(dim=1), key_rows)
    assert changed[f"{prefix}.weight"][key_rows].all()
    assert torch.equal(changed[f"{prefix}.bias"], key_rows)
    _assert_bit_identical(model, before)


def test_mixtral_expert_two_changes_only_expert_two(tiny):
    model = tiny("tiny-mixtral").model
    adapter, before = adapter_for(model), _snapshot(model)
    for component, rows in (("ffn.gate", slice(0, 128)), ("ffn.up", slice(128, 256))):
        with perturbed(model, adapter, Perturbation("gaussian", component, MIDDLE, 0.1, 0, expert=2)):
            changed = _changed_masks(model, before)
        mask = changed.pop(f"model.layers.{MIDDLE}.mlp.experts.gate_up_proj")
        assert changed == {}
        expected = torch.zeros_like(mask)
        expected[2, rows] = True
        assert torch.equal(mask, expected), component
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("component,touched", [
    ("ffn.gate", {"gate_proj": 1}), ("ffn.up", {"up_proj": 1}), ("ffn.down", {"down_proj": 0}),
    ("ffn.neurons", {"gate_proj": 1, "up_proj": 1, "down_proj": 0}),
])
def test_neurons_touch_exactly_their_own_rows_or_columns(tiny, component, touched):
    """ffn.gate/ffn.up: only their rows of the chosen neurons; ffn.down: only its columns; ffn.neurons: all
    three, the same neurons. `touched` maps each changed matrix to the axis its neuron index is NOT on."""
    model = tiny("tiny-llama").model
    adapter, before = adapter_for(model), _snapshot(model)
    p = Perturbation("neurons", component, MIDDLE, 0.25, 3, mode="zero")
    with perturbed(model, adapter, p) as report:
        changed = _changed_masks(model, before)
        values = {name: model.get_parameter(name).detach().clone() for name in changed}
    mlp = f"model.layers.{MIDDLE}.mlp"
    assert set(changed) == {f"{mlp}.{m}.weight" for m in touched}
    neuron_sets = []
    for matrix, other_axis in touched.items():
        name = f"{mlp}.{matrix}.weight"
        neurons = changed[name].any(dim=other_axis)  # [128] neurons with any changed element
        assert int(neurons.sum()) == 32  # 25% of 128 intermediate neurons
        # whole rows/columns of exactly those neurons are zero; nothing else changed
        assert bool((changed[name] == neurons.unsqueeze(other_axis).expand_as(changed[name])).all())
        assert bool((values[name].index_select(1 - other_axis, neurons.nonzero().squeeze(1)) == 0).all())
        neuron_sets.append(neurons)
    assert all(torch.equal(n, neuron_sets[0]) for n in neuron_sets)
    assert report.restored is True and report.changed_fraction == pytest.approx(0.25, abs=0.01)


def test_top_and_bottom_neurons_are_ranked_by_whole_neuron_weight_norm(tiny):
    from esa_pipeline.core.perturbation.perturb import neuron_norms

    model = tiny("tiny-llama").model
    adapter, before = adapter_for(model), _snapshot(model)
    mlp = f"model.layers.{MIDDLE}.mlp"
    gate, up, down = (before[f"{mlp}.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))
    expected = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()  # [128]
    p_top = Perturbation("neurons", "ffn.down", MIDDLE, 0.1, 0, selection="top", mode="zero")
    torch.testing.assert_close(neuron_norms(model, adapter, p_top), expected)
    k = round(0.1 * 128)
    for selection, largest in (("top", True), ("bottom", False)):
        p = Perturbation("neurons", "ffn.down", MIDDLE, 0.1, 0, selection=selection, mode="zero")
        with perturbed(model, adapter, p):
            hit = _changed_masks(model, before)[f"{mlp}.down_proj.weight"].any(dim=0)
        assert set(hit.nonzero().squeeze(1).tolist()) == set(expected.topk(k, largest=largest).indices.tolist())
    with pytest.raises(ValueError, match="whole FFN neurons"):
        Perturbation("gaussian", "ffn.neurons", MIDDLE, 0.1, 0)


def test_scale_multiplies_gains_and_leaves_layernorm_bias(tiny):
    model = tiny("tiny-pythia").model
    adapter, before = adapter_for(model), _snapshot(model)
    norm = f"gpt_neox.layers.{MIDDLE}.input_layernorm"
    with torch.no_grad():
        model.get_parameter(f"{norm}.weight").uniform_(0.5, 1.5)  # LayerNorm inits gains to exactly 1
    before = _snapshot(model)
    with perturbed(model, adapter, Perturbation("scale", "norm.input", MIDDLE, 0.9, 0)):
        assert torch.equal(model.get_parameter(f"{norm}.weight"), before[f"{norm}.weight"] * 0.9)
        assert set(_changed_masks(model, before)) == {f"{norm}.weight"}
    _assert_bit_identical(model, before)


def test_top_and_bottom_selection_follow_scores(tiny):
    model = tiny("tiny-llama").model
    adapter = adapter_for(model)
    weight = adapter.slices("ffn.down", MIDDLE)[0].get(model)
    scores = [weight.abs().clone()]
    k = round(0.05 * weight.numel())
    for selection, largest in (("top", True), ("bottom", False)):
        spec = Perturbation("zero", "ffn.down", MIDDLE, 0.05, 0, selection=selection)
        expected = torch.zeros(weight.numel(), dtype=torch.bool)
        expected[torch.topk(scores[0].flatten(), k, largest=largest).indices] = True
        before = weight.clone()
        with perturbed(model, adapter, spec, scores=scores):
            assert torch.equal((weight == 0).flatten() & (before != 0).flatten(), expected)


def test_bit_flip_flips_the_bf16_exponent_msb(tiny):
    model = tiny("tiny-llama", dtype="bfloat16").model
    adapter = adapter_for(model)
    weight = adapter.slices("attention.output", MIDDLE)[0].get(model)
    before = weight.clone()
    with perturbed(model, adapter, Perturbation("bit_flip", "attention.output", MIDDLE, 0.01, 0)) as report:
        xor = (_bits(weight) ^ _bits(before)).flatten()
    changed = xor != 0
    assert int(changed.sum()) == report.n_changed == round(0.01 * weight.numel())
    assert (xor[changed] == 1 << 14).all()
    assert torch.equal(_bits(weight), _bits(before))


def test_bf16_small_sigma_changes_few_stored_elements(tiny):
    model = tiny("tiny-llama", dtype="bfloat16").model
    adapter = adapter_for(model)
    fractions = {}
    for sigma in (0.001, 0.1):
        with perturbed(model, adapter, Perturbation("gaussian", "ffn.up", MIDDLE, sigma, 0)) as report:
            fractions[sigma] = report.changed_fraction
    assert fractions[0.001] < 0.5 < fractions[0.1]  # bf16 has 8 mantissa bits: 0.1% noise mostly rounds away


def test_restores_when_the_body_raises(tiny_model):
    model, adapter = tiny_model.model, adapter_for(tiny_model.model)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with perturbed(model, adapter, Perturbation("gaussian", "ffn.down", MIDDLE, 0.2, 0)) as report:
            assert _changed_masks(model, before)
            raise RuntimeError("evaluation failed")
    assert report.restored is True
    _assert_bit_identical(model, before)


def test_tied_embedding_perturbation_is_noted(tiny):
    model = tiny("tiny-llama").model  # tied like SmolLM2
    adapter = adapter_for(model)
    with perturbed(model, adapter, Perturbation("gaussian", "embedding", None, 0.1, 0)) as report:
        assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert any("tied embeddings" in note for note in report.notes)


_DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    from esa_pipeline.core.models.adapters import adapter_for
    from esa_pipeline.core.models.registry import load_model
    from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed
    lm = load_model("tiny-mixtral", dtype="float32", device="cpu")
    adapter = adapter_for(lm.model)
    digest = hashlib.sha256()
    for seed in (0, 1):
        for spec in (Perturbation("gaussian", "ffn.down", 2, 0.1, seed, expert=1),
                     Perturbation("neurons", "ffn.gate", 1, 0.5, seed),
                     Perturbation("sign_flip", "attention.key", 3, 0.1, seed)):
            with perturbed(lm.model, adapter, spec):
                for name, p in lm.model.named_parameters():
                    digest.update(p.detach().numpy().tobytes())
        print(seed, digest.hexdigest())
""")


@pytest.mark.slow
def test_same_spec_gives_identical_weights_in_fresh_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two interpreters at once on a small machine
    procs = [subprocess.Popen([sys.executable, "-c", _DIGEST_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        runs.append(out.split())
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[0][3]  # seed 1 produced different weights from seed 0


def test_antithetic_adds_the_same_draw_negated(tiny):
    lm = tiny("tiny-llama")
    adapter = adapter_for(lm.model)
    view = adapter.slices("ffn.down", 1)[0].get(lm.model)
    original = view.detach().clone()
    deltas = []
    for negate in (False, True):
        spec = Perturbation("gaussian", "ffn.down", 1, 0.1, 7, antithetic=negate)
        with perturbed(lm.model, adapter, spec):
            deltas.append(view.detach().float() - original.float())
    assert torch.equal(view, original)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], -deltas[0], rtol=0, atol=1e-6)
    # one draw for the pair: the seed ignores the sign, so earlier results' seeds are unchanged too
    assert spec.spec_seed() == Perturbation("gaussian", "ffn.down", 1, 0.1, 7).spec_seed()
    with pytest.raises(ValueError, match="no sign to flip"):
        Perturbation("zero", "ffn.down", 1, 0.1, 7, antithetic=True)


def test_different_seed_differs_and_spec_seed_is_stable():
    spec = Perturbation("gaussian", "ffn.down", 15, 0.1, 0)
    # Pinned: changing the hash would silently change every stored result's noise.
    assert spec.spec_seed() == 5154819266819545162
    assert Perturbation("gaussian", "ffn.down", 15, 0.1, 1).spec_seed() != spec.spec_seed()
    assert Perturbation("gaussian", "ffn.down", 15, 1e-1, 0) == spec
    assert Perturbation.from_dict(spec.to_dict()).spec_seed() == spec.spec_seed()


@pytest.mark.parametrize(
    ("fields", "match"),
    [(dict(kind="gaussian", strength=0.0), "strength must be"),
     (dict(kind="gaussian", strength=-0.1), "strength must be"),
     (dict(kind="neurons", strength=1.5), r"fraction in \(0, 1\]"),
     (dict(kind="dropout", strength=0.1), "unknown perturbation kind"),
     (dict(kind="gaussian", component="ffn.wrong", strength=0.1), "unknown component"),
     (dict(kind="scale", component="ffn.down", strength=1.1), "norm gains"),
     (dict(kind="gaussian", strength=0.1, mode="drop"), "unknown mode"),
     (dict(kind="gaussian", strength=0.1, selection="top"), "picks individual weights"),
     (dict(kind="scale", component="norm.input", strength=0.9, selection="bottom"), "picks individual weights")],
)
def test_invalid_specs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        Perturbation(**{"component": "ffn.down", "layer": 1, "seed": 0, **fields})


@pytest.mark.parametrize(
    ("spec", "match"),
    [(Perturbation("gaussian", "ffn.down", 9, 0.1, 0), "out of range"),
     (Perturbation("zero", "ffn.down", 1, 0.1, 0, selection="top"), "pass scores="),
     (Perturbation("router", "moe.router", 1, 0.1, 0), "not applicable to LlamaForCausalLM"),
     (Perturbation("gaussian", "ffn.down", 1, 0.1, 0, expert=1), "not a mixture of experts"),
     (Perturbation("bit_flip", "ffn.down", 1, 0.1, 0, bit=32), r"bit 32 does not exist in torch.float32")],
)
def test_model_dependent_errors_come_before_any_write(tiny, spec, match):
    model = tiny("tiny-llama").model
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        with perturbed(model, adapter_for(model), spec):
            pytest.fail("the body must not run")
    _assert_bit_identical(model, before)


def test_smollm2_perturbation_restores_exactly(smollm2):
    adapter = adapter_for(smollm2.model)
    weight = adapter.slices("ffn.down", 15)[0].get(smollm2.model)
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    with perturbed(smollm2.model, adapter, Perturbation("gaussian", "ffn.down", 15, 0.1, 0)) as report:
        assert hashlib.sha256(weight.numpy().tobytes()).hexdigest() != digest
    assert report.restored and report.changed_fraction == 1.0
    assert hashlib.sha256(weight.numpy().tobytes()).hexdigest() == digest


@pytest.mark.parametrize(
    ("fields", "match"),
    [(dict(expert=True), "expert must be an int"),  # issue 15: a bool passed as expert 1, then ZeroDivisionError
     (dict(expert=-1), "expert must be >= 0"),
     (dict(expert=1.0), "expert must be an int"),
     (dict(layer=True), "layer must be an int"),
     (dict(seed=False), "seed must be an int"),
     (dict(seed=1.5), "seed must be an int"),
     (dict(strength=True), "strength must be a number"),
     (dict(strength=float("inf")), "must be finite"),
     (dict(strength=float("nan")), "must be finite"),
     (dict(noise_sigma=float("inf")), "noise_sigma must be finite"),
     (dict(noise_sigma=0.0), "noise_sigma must be > 0"),
     (dict(kind="bit_flip", bit=True), "bit must be an int"),
     (dict(kind="bit_flip", bit=-1), "bit must be >= 0"),
     (dict(antithetic=1), "antithetic must be True or False"),
     (dict(kind="quantize", strength=4, group_size=True), "group_size must be an int"),
     (dict(kind="quantize", strength=4, group_size=-32), "group_size must be >= 0"),
     (dict(kind="quantize", strength=True), "strength must be a number")],
)
def test_bools_non_finite_and_negative_indices_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        Perturbation(**{"kind": "gaussian", "component": "ffn.down", "layer": 1, "strength": 0.1, "seed": 0,
                        **fields})  # fmt: skip


def test_mixtral_expert_bool_or_out_of_range_is_refused_before_any_write(tiny):
    model = tiny("tiny-mixtral").model
    adapter = adapter_for(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="expert must be an int"):
        Perturbation("gaussian", "ffn.down", 1, 0.1, 0, expert=True)
    with pytest.raises(ValueError, match="expert must be an int"):
        adapter.slices("ffn.down", 1, True)
    with pytest.raises(ValueError, match=rf"expert {adapter.n_experts} is out of range"):
        with perturbed(model, adapter, Perturbation("gaussian", "ffn.down", 1, 0.1, 0, expert=adapter.n_experts)):
            pytest.fail("the body must not run")
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("kind", ["quantize", "prune"])
def test_a_misspelt_component_of_a_compression_kind_is_called_unknown(kind):
    # was "quantize acts on weight matrices: use a component other than norm gains, got 'ffn.dwn'"
    with pytest.raises(ValueError, match="unknown component 'ffn.dwn': use one of attention.query"):
        Perturbation(kind, "ffn.dwn", 0, 4 if kind == "quantize" else 0.5, 0,
                     mode="symmetric" if kind == "quantize" else "magnitude",
                     group_size=32 if kind == "quantize" else None)  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_importance_scores_are_refused_before_any_weight_changes(tiny, bad):
    # torch.topk ranks NaN above every number: a NaN score (e.g. a gradient that overflowed in bf16) made its
    # weight the "top" one, silently
    lm = tiny("tiny-llama")
    adapter = adapter_for(lm.model)
    view = adapter.slices("ffn.down", 0)[0].get(lm.model)
    before = view.clone()
    scores = view.abs().clone()
    scores[0, 0] = bad
    p = Perturbation("zero", "ffn.down", 0, 0.01, 0, selection="top")
    with pytest.raises(ValueError, match=r"scores\[0\] has 1 non-finite value"):
        with perturbed(lm.model, adapter, p, [scores]):
            pass
    assert torch.equal(view, before)
