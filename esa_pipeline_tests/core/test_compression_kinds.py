"""quantize / prune / layer_drop: exact values on small matrices, exact elements touched on every tiny family,
exact restore, and layer_drop == a real bypass through the prefix cache."""

import pytest
import torch

from esa_pipeline.core.evaluation.paired import evaluate_against
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import (
    final_hidden_states,
    gather_scored,
    score_hidden,
    scored_targets,
)
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.perturbation.perturb import Perturbation, input_axis, perturbed, resolve_slices
from esa_pipeline.core.perturbation.prune import prune_mask
from esa_pipeline.core.perturbation.quantize import fake_quantize
from esa_pipeline_tests.conftest import ALL_TINY


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- quantize: hand-computed grids (scales are powers of two, so every value is exact in fp32) ----------
def test_symmetric_per_channel_rounds_half_to_even_on_each_rows_grid():
    w = t([[6.0, -3.0, 1.0, 2.9, -5.0], [0.75, -0.5, 0.25, 0.3, 0.0]])
    # row 0: 3 bits -> qmax 3, scale 6/3 = 2: w/2 = [3, -1.5, .5, 1.45, -2.5] -> [3, -2, 0, 1, -2]
    # row 1: scale 0.25: w/.25 = [3, -2, 1, 1.2, 0] -> [3, -2, 1, 1, 0]
    expected = t([[6.0, -4.0, 0.0, 2.0, -4.0], [0.75, -0.5, 0.25, 0.25, 0.0]])
    assert torch.equal(fake_quantize(w, 3, 0, "symmetric"), expected)


def test_asymmetric_uses_min_max_grid_with_exact_zero():
    w = t([[-1.0, 0.5, 2.0, 1.0], [4.0, 5.0, 6.0, 7.0]])
    # row 0: 2 bits -> 4 levels; lo -1, hi 2, scale 1, zero 1: q = round(w) + 1 = [0, 1, 3, 2] -> [-1, 0, 2, 1]
    # row 1: lo clipped to 0 (0 stays representable), hi 7, scale 7/3; zero 0
    got = fake_quantize(w, 2, 0, "asymmetric")
    assert torch.equal(got[0], t([-1.0, 0.0, 2.0, 1.0]))
    scale = torch.tensor(7.0) / 3
    assert torch.equal(got[1], torch.round(w[1] / scale) * scale)


def test_groups_run_along_the_input_axis_and_the_last_group_may_be_shorter():
    row = torch.zeros(40)
    row[:32] = torch.linspace(-6.0, 6.0, 32)  # first group of 32: absmax 6
    row[32:] = t([1.5, -0.75, 0.2, 0.0, 1.0, -1.5, 0.4, 0.6])  # last 8 inputs: absmax 1.5
    w = torch.stack([row, 2 * row])  # [2, 40]
    got = fake_quantize(w, 3, 32, "symmetric")
    for r in range(2):
        for lo, hi in ((0, 32), (32, 40)):
            g = w[r, lo:hi]
            scale = g.abs().max() / 3
            assert torch.equal(got[r, lo:hi], torch.clamp(torch.round(g / scale), -3, 3) * scale)
    # tail at row 0: scale 0.5: [3, -1.5, .4, 0, 2, -3, .8, 1.2] -> [3, -2, 0, 0, 2, -3, 1, 1]
    assert torch.equal(got[0, 32:], t([1.5, -1.0, 0.0, 0.0, 1.0, -1.5, 0.5, 0.5]))


def test_eight_bits_per_channel_matches_a_reference_loop():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 64, generator=gen)
    got = fake_quantize(w, 8, 64, "asymmetric")
    for r in range(5):
        lo, hi = min(float(w[r].min()), 0.0), max(float(w[r].max()), 0.0)
        scale = torch.tensor((hi - lo) / 255, dtype=torch.float32)
        zero = torch.round(-torch.tensor(lo, dtype=torch.float32) / scale)
        ref = (torch.clamp(torch.round(w[r] / scale) + zero, 0, 255) - zero) * scale
        assert torch.allclose(got[r], ref, rtol=0, atol=1e-6)
        assert float((got[r] - w[r]).abs().max()) <= float(scale) / 2 + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantized_rows_have_at_most_2_to_the_bits_levels(bits):
    w = torch.randn(3, 128, generator=torch.Generator().manual_seed(bits))
    for scheme in ("symmetric", "asymmetric"):
        got = fake_quantize(w, bits, 0, scheme)
        assert all(len(torch.unique(row)) <= 2**bits for row in got)


def test_quantize_refuses_bad_parameters():
    with pytest.raises(ValueError, match="bit width"):
        fake_quantize(torch.ones(2, 4), 5, 0, "symmetric")
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(torch.ones(2, 4), 4, 16, "symmetric")
    with pytest.raises(ValueError, match="weight matrix"):
        fake_quantize(torch.ones(4), 4, 0, "symmetric")


# ---- prune: known survivors ------------------------------------------------------------------------------
def test_magnitude_prunes_the_smallest_of_the_whole_slice():
    w = t([[1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4]])
    assert prune_mask(w, "magnitude", 0.5).tolist() == [[False] * 4, [True] * 4]


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    w = t([[1.0, -2.0, 3.0, 0.5, 0.0, 9.0, -9.0, 1.0], [0.1, 0.4, -0.3, 0.2, 5.0, 5.0, 5.0, 5.0]])
    # ties (the last group) prune the earlier elements first
    assert (~prune_mask(w, "2:4", 0.5)).tolist() == [
        [False, True, True, False, False, True, True, False],
        [False, True, True, False, False, False, True, True],
    ]


def test_wanda_ranks_weight_times_input_norm_within_each_row():
    w = t([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    x_norm = t([10.0, 1.0, 1.0, 1.0])
    mask = prune_mask(w, "wanda", 0.5, scores=w.abs() * x_norm)
    # row 0 scores [10, 2, 3, 4] -> prune cols 1, 2; row 1 [40, 3, 2, 1] -> prune cols 2, 3
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True]]
    with pytest.raises(ValueError, match="scores"):
        prune_mask(w, "wanda", 0.5)
    with pytest.raises(ValueError, match="0.5"):
        prune_mask(w, "2:4", 0.25)


# ---- through the engine, every family and fused layout ------------------------------------------------------
def _param_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ALL_TINY)
@pytest.mark.parametrize("component", ["attention.key", "ffn.up"])
def test_quantize_writes_exactly_the_slice_and_restores(tiny, family, component):
    lm = tiny(family)
    model, adapter = lm.model, adapter_for(lm.model)
    p = Perturbation("quantize", component, 1, 3, 0, mode="asymmetric", group_size=32)
    before = _param_snapshot(model)
    slices = resolve_slices(adapter, p)
    expected = [fake_quantize(s.get(model), 3, 32, "asymmetric", input_axis(model, s)) for s in slices]
    with perturbed(model, adapter, p) as report:
        after = _param_snapshot(model)
        for s, e in zip(slices, expected, strict=True):
            assert torch.equal(s.get(model), e.to(s.get(model).dtype))
        touched = {s.param_name for s in slices}
        for name, value in after.items():
            if name in touched:  # outside the slice (the other fused parts) nothing moved
                diff = after[name] != before[name]
                for s in slices:
                    if s.param_name == name:
                        region = s.get(model)
                        mask = torch.zeros_like(after[name], dtype=torch.bool)
                        mask_view = mask.view(s.view_shape) if s.view_shape else mask
                        mask_view[s.index] = True
                        assert not bool((diff & ~mask).any()), name
                        assert region.shape == expected[slices.index(s)].shape
            else:
                assert torch.equal(value, before[name]), name
        assert 0 < report.relative_change < 1
    assert report.restored
    assert all(torch.equal(p_.detach(), before[n]) for n, p_ in model.named_parameters())


def test_prune_on_fused_phi3_qkv_zeroes_only_the_query_rows(tiny):
    lm = tiny("tiny-phi3")
    model, adapter = lm.model, adapter_for(lm.model)
    p = Perturbation("prune", "attention.query", 0, 0.5, 0, mode="2:4")
    (s,) = resolve_slices(adapter, p)
    full = model.get_parameter(s.param_name).detach().clone()
    with perturbed(model, adapter, p) as report:
        now = model.get_parameter(s.param_name).detach()
        q = s.get(model)
        assert int((q == 0).sum()) == q.numel() // 2
        rows = q.shape[0]
        assert torch.equal(now[rows:], full[rows:])  # key and value rows untouched
        assert report.changed_fraction == pytest.approx(0.5)
    assert torch.equal(model.get_parameter(s.param_name).detach(), full)


def test_wanda_prune_needs_scores_and_uses_them(tiny):
    lm = tiny("tiny-llama")
    model, adapter = lm.model, adapter_for(lm.model)
    p = Perturbation("prune", "ffn.down", 0, 0.25, 0, mode="wanda")
    with pytest.raises(ValueError, match="wanda"):
        with perturbed(model, adapter, p):
            pass
    (s,) = resolve_slices(adapter, p)
    scores = [torch.arange(s.get(model).numel(), dtype=torch.float32).reshape(s.get(model).shape)]
    with perturbed(model, adapter, p, scores=scores):
        w = s.get(model)
        n_in = w.shape[-1]
        assert bool((w[:, : n_in // 4] == 0).all())  # the lowest scores are the first quarter of each row


def test_gpt2_conv1d_is_quantized_along_its_input_rows(tiny):
    lm = tiny("tiny-gpt2")
    model, adapter = lm.model, adapter_for(lm.model)
    p = Perturbation("quantize", "attention.query", 0, 2, 0, mode="symmetric", group_size=0)
    (s, _bias) = adapter.slices("attention.query", 0)
    assert input_axis(model, s) == 0  # Conv1D [in, out]
    w, bias = s.get(model).clone(), _bias.get(model).clone()  # [H_in, H_q], [H_q]
    with perturbed(model, adapter, p):
        got = s.get(model)
        # per-channel = one scale per OUTPUT column, the absmax over its inputs (rows)
        assert torch.equal(got, fake_quantize(w.T, 2, 0, "symmetric").T)
        assert torch.equal(got.abs().amax(dim=0), w.abs().amax(dim=0))  # each column's absmax is a grid point
        assert torch.equal(_bias.get(model), bias)  # weight-only: the bias keeps full precision


@pytest.mark.parametrize("component", ["ffn.up", "ffn.down"])
def test_gpt_oss_experts_are_quantized_along_the_axis_they_read_inputs_from(tiny, component):
    # GPT-OSS computes x @ gate_up_proj[e] ([E, H, 2I]) and x @ down_proj[e] ([E, I, H]): inputs are axis 1.
    lm = tiny("tiny-gpt-oss")
    model, adapter = lm.model, adapter_for(lm.model)
    p = Perturbation("quantize", component, 0, 2, 0, mode="symmetric", group_size=0, expert=1)
    s = adapter.slices(component, 0, expert=1)[0]
    assert input_axis(model, s) == 0  # one expert's [H, I] / [I, H] view: the inputs are its rows
    w = s.get(model).clone()
    with perturbed(model, adapter, p):
        assert torch.equal(s.get(model), fake_quantize(w.T, 2, 0, "symmetric").T)
    every = adapter.slices(component, 0)[0]
    assert every.get(model).dim() == 3 and input_axis(model, every) == 1


@pytest.mark.parametrize("family", ALL_TINY)
def test_layer_drop_block_makes_the_layer_an_identity(tiny, family):
    lm = tiny(family)
    model, adapter = lm.model, adapter_for(lm.model)
    layers = adapter.decoder_layers(model)
    seen = {}
    handles = [layers[1].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True),
               layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).clone()))]
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    before = _param_snapshot(model)
    try:
        with perturbed(model, adapter, Perturbation("layer_drop", "block", 1, 1.0, 0)) as report:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["in"], seen["out"])
    assert report.relative_change == 1.0 and report.restored
    assert all(torch.equal(p_.detach(), before[n]) for n, p_ in model.named_parameters())


@pytest.mark.parametrize("family,attn,mlp", [("tiny-llama", "self_attn", "mlp"), ("tiny-pythia", "attention", "mlp")])
def test_layer_drop_sub_block_equals_zeroing_its_output_through_the_prefix_cache(tiny, family, attn, mlp):
    lm = tiny(family)
    model, adapter = lm.model, adapter_for(lm.model)
    base = perplexity(lm, load_texts("bundled", max_docs=2), window=32, max_tokens=96, batch_size=2)
    cache = PrefixCache.build(lm, base, adapter)
    for component, module in (("block.attention", attn), ("block.mlp", mlp)):
        p = Perturbation("layer_drop", component, 1, 1.0, 0)
        cached = evaluate_against(lm, base, p, cache=cache)
        assert cached.used_prefix_cache and cached.restored

        def zero(m, args, out):
            return (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

        handle = adapter.decoder_layers(model)[1].get_submodule(module).register_forward_hook(zero)
        try:
            bypass = sum(float(_nll(model, b).sum()) for b in base.batches())
        finally:
            handle.remove()
        assert cached.nll_sum == pytest.approx(bypass, rel=1e-6), component


@pytest.mark.parametrize("fields,match", [
    (dict(kind="quantize", component="ffn.up", layer=0, strength=4, seed=0, mode="symmetric"), "group_size"),
    (dict(kind="quantize", component="ffn.up", layer=0, strength=4, seed=0, group_size=0), "scheme"),
    (dict(kind="quantize", component="norm.input", layer=0, strength=4, seed=0, mode="symmetric", group_size=0),
     "norm"),
    (dict(kind="prune", component="ffn.up", layer=0, strength=1.0, seed=0, mode="magnitude"), "sparsity"),
    (dict(kind="prune", component="ffn.up", layer=0, strength=0.5, seed=0, mode="magnitude", group_size=32),
     "group_size"),
    (dict(kind="layer_drop", component="ffn.up", layer=0, strength=1.0, seed=0), "block"),
    (dict(kind="layer_drop", component="block", layer=0, strength=0.5, seed=0), "1.0"),
    (dict(kind="gaussian", component="ffn.up", layer=0, strength=0.1, seed=0, group_size=32), "group_size"),
])
def test_invalid_compression_specs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        Perturbation(**fields)


def _nll(model, batch) -> torch.Tensor:
    """[n] fp64 per-token NLL of a batch's scored positions (chunked head, as the evaluator scores)."""
    from esa_pipeline.core.models.adapters import adapter_for

    adapter = adapter_for(model)
    hidden = gather_scored(final_hidden_states(model, adapter, batch), batch)
    return score_hidden(model, adapter, hidden, scored_targets(batch)).nll.double()
