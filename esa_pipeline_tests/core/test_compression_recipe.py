"""Recipe allocation (exact ILP answers), whole-recipe application (restore, equality with nested contexts),
additivity ratio, and Block Influence / angular distance from the prefix cache."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from esa_pipeline.core.analysis.block_influence import layer_drop_agreement, layer_similarity
from esa_pipeline.core.compression.recipe import (
    achieved,
    additivity,
    apply_all,
    choose_allocation,
    recipe_json,
    uniform_allocation,
)
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
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed


def points(costs: dict, n_params: dict) -> pd.DataFrame:
    return pd.DataFrame([{"layer": layer, "component": comp, "value": v, "delta_nll": c, "n_params": n_params[layer]}
                         for (layer, comp), options in costs.items() for v, c in options.items()])


COSTS = {(0, "ffn.up"): {2: 1.0, 4: 0.1, 8: 0.0}, (1, "ffn.up"): {2: 0.5, 4: 0.05, 8: 0.0}}
SIZES = {0: 100, 1: 300}


@pytest.mark.parametrize("budget,bits,cost", [(4.0, [4, 4], 0.15), (3.5, [8, 2], 0.5), (8.0, [8, 8], 0.0)])
def test_bit_allocation_is_the_exact_knapsack_optimum(budget, bits, cost):
    chosen = choose_allocation(points(COSTS, SIZES), budget, kind="quantize")
    assert chosen["value"].tolist() == bits
    assert chosen["delta_nll"].sum() == pytest.approx(cost)
    assert achieved(chosen) <= budget + 1e-12


def test_sparsity_allocation_meets_the_target_from_above():
    costs = {(0, "ffn.up"): {0.25: 0.1, 0.5: 0.2, 0.75: 2.0}, (1, "ffn.up"): {0.25: 0.3, 0.5: 0.4, 0.75: 0.6}}
    chosen = choose_allocation(points(costs, SIZES), 0.5, kind="prune")
    # (0.25, 0.75): avg (25 + 225)/400 = 0.625 cost 0.7; (0.5, 0.5): 0.5 cost 0.6 -> optimum
    assert chosen["value"].tolist() == [0.5, 0.5]
    assert uniform_allocation(points(costs, SIZES), 0.75)["delta_nll"].sum() == pytest.approx(2.6)


def test_unreachable_budget_and_missing_points_are_refused():
    with pytest.raises(ValueError, match="reachable averages are 2..8"):
        choose_allocation(points(COSTS, SIZES), 1.0, kind="quantize")
    with pytest.raises(ValueError, match="not measured for every unit"):
        uniform_allocation(points(COSTS, SIZES).iloc[1:], 2)


def test_recipe_json_round_trips_the_assignment():
    chosen = choose_allocation(points(COSTS, SIZES), 4.0, kind="quantize")
    data = __import__("json").loads(recipe_json(chosen, model="m", kind="quantize", budget=4.0,
                                                params={"mode": "symmetric", "group_size": 32}))
    assert data["achieved"] == 4.0 and [a["value"] for a in data["assignments"]] == [4.0, 4.0]


def test_additivity_ratio_and_document_bootstrap_on_known_sums():
    measured = pd.DataFrame({"window_id": [0, 1, 2, 3], "delta_nll_sum": [2.0, 4.0, 6.0, 8.0],
                             "n_tokens": [10, 10, 10, 10]})
    pw = pd.DataFrame({"window_id": [0, 1, 2, 3] * 2, "layer": [0] * 4 + [1] * 4, "component": ["ffn.up"] * 8,
                       "value": [4] * 8, "delta_nll_sum": [0.5, 1.0, 1.5, 2.0] * 2})
    assignment = pd.DataFrame({"layer": [0, 1], "component": ["ffn.up"] * 2, "value": [4, 4]})
    out = additivity(measured, pw, assignment, {0: "a", 1: "a", 2: "b", 3: "c"})
    assert out["additivity_ratio"] == pytest.approx(2.0)
    assert out["ratio_ci_low"] == pytest.approx(2.0) and out["ratio_ci_high"] == pytest.approx(2.0)
    assert out["predicted_delta_nll"] == pytest.approx(0.25) and out["n_docs"] == 3


def _additivity(measured_sums, unit_sums, docs=("a", "a", "b", "c")):
    measured = pd.DataFrame({"window_id": [0, 1, 2, 3], "delta_nll_sum": measured_sums, "n_tokens": [10] * 4})
    pw = pd.DataFrame({"window_id": [0, 1, 2, 3], "layer": 0, "component": "ffn.up", "value": 4,
                       "delta_nll_sum": unit_sums})
    assignment = pd.DataFrame({"layer": [0], "component": ["ffn.up"], "value": [4]})
    return additivity(measured, pw, assignment, dict(enumerate(docs)))


@pytest.mark.parametrize(("measured", "units", "docs", "ratio", "ci", "note"), [
    # a negative predicted sum (units that measured below 0: noise, or a real gain): measured/predicted is no
    # additivity ratio (README's SmolLM2 recipe: -0.063 / -0.47 was stored as 0.13)
    ([-1.0, 0.5, 0.2, 0.1], [-8.0, -4.0, -4.0, -2.8], ("a", "a", "b", "c"), None, None,
     "predicted ΔNLL -0.47 <= 0: measured/predicted is not an additivity ratio"),
    ([0.0] * 4, [0.0] * 4, ("a", "a", "b", "c"), None, None, "predicted ΔNLL 0 <= 0"),
    ([1.0, np.inf, 1.0, 1.0], [1.0] * 4, ("a", "a", "b", "c"), None, None, "non-finite ΔNLL (loss overflowed)"),
    # one document: the ratio, no CI, and why
    ([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0], ("a",) * 4, 2.0, None, "1 document: no bootstrap CI"),
    # resamples whose predicted sum is <= 0 make the bootstrap ratio meaningless: no CI, the reason
    ([1.0, 1.0, 1.0, 1.0], [3.0, 0.0, -1.0, -1.0], ("a", "b", "c", "d"), 4.0, None,
     "the predicted sum is <= 0 in some document resamples: no bootstrap CI"),
    ([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0], ("a", "a", "b", "c"), 2.0, (2.0, 2.0), ""),
])  # fmt: skip
def test_additivity_ratio_is_null_with_the_reason_when_it_means_nothing(measured, units, docs, ratio, ci, note):
    out = _additivity(measured, units, docs)
    assert out["note"].startswith(note) if note else out["note"] == ""
    assert (math.isnan(out["additivity_ratio"]) if ratio is None else out["additivity_ratio"] == pytest.approx(ratio))
    if ci is None:
        assert math.isnan(out["ratio_ci_low"]) and math.isnan(out["ratio_ci_high"])
    else:
        assert (out["ratio_ci_low"], out["ratio_ci_high"]) == pytest.approx(ci)


@pytest.fixture
def llama_setup(tiny):
    lm = tiny("tiny-llama")
    base = perplexity(lm, load_texts("bundled", max_docs=2), window=32, max_tokens=96, batch_size=2)
    return lm, base, PrefixCache.build(lm, base, adapter_for(lm.model))


def test_apply_all_equals_nested_contexts_and_restores(llama_setup):
    lm, base, cache = llama_setup
    model = lm.model
    specs = [Perturbation("quantize", "ffn.down", 1, 2, 0, mode="symmetric", group_size=32),
             Perturbation("prune", "attention.value", 0, 0.5, 0, mode="magnitude")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = apply_all(lm, base, specs, cache=cache)
    assert result["restored"] and result["used_prefix_cache"]
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    with perturbed(model, cache.adapter, specs[0]), perturbed(model, cache.adapter, specs[1]):
        nested = sum(float(_nll(model, b).sum()) for b in base.batches())
    assert result["nll_sum"] == pytest.approx(nested, rel=1e-6)
    with pytest.raises(ValueError, match="one spec per unit"):
        apply_all(lm, base, [specs[0], Perturbation("prune", "ffn.down", 1, 0.5, 0, mode="magnitude")], cache=cache)


def test_block_influence_is_one_minus_cosine_of_captured_streams(llama_setup):
    lm, base, cache = llama_setup
    model, n = lm.model, cache.n_layers
    sim = layer_similarity(cache, spans=(1, 2))
    assert len(sim) == n + (n - 1)
    # reference: hidden_states from the model; the last one is after the final norm, so take the last layer's
    # own output from a hook instead
    outs = {}
    handle = cache.adapter.decoder_layers(model)[n - 1].register_forward_hook(
        lambda m, a, o: outs.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    sums = np.zeros(n)
    tokens = 0
    try:
        for batch in cache.batches:
            with torch.no_grad():
                hs = model(input_ids=batch.input_ids, output_hidden_states=True, use_cache=False).hidden_states
            states = list(hs[:n]) + [outs["last"]]
            assert not torch.equal(hs[-1], outs["last"])  # HF's last hidden state is normed
            mask = batch.score_mask
            for layer in range(n):
                cos = torch.nn.functional.cosine_similarity(states[layer][mask].double(), states[layer + 1][mask].double(), dim=-1)
                sums[layer] += float((1 - cos).sum())
            tokens += int(mask.sum())
    finally:
        handle.remove()
    one = sim[sim["span"] == 1].sort_values("layer")
    assert one["block_influence"].to_numpy() == pytest.approx(sums / tokens, rel=1e-6)
    assert ((one["angular_distance"] >= 0) & (one["angular_distance"] <= 1)).all()
    assert int(one["n_tokens"].iloc[0]) == tokens == base.n_tokens


def test_layer_drop_agreement_gives_rho_or_a_reason():
    sim = pd.DataFrame({"model": "m", "layer": [0, 1, 2, 3], "span": 1, "block_influence": [0.1, 0.4, 0.2, 0.9],
                        "angular_distance": [0.1, 0.2, 0.3, 0.4]})
    sens = pd.DataFrame({"model": "m", "kind": "layer_drop", "component": "block", "layer": [0, 1, 2, 3],
                         "delta_nll": [0.01, 0.5, 0.1, 2.0]})
    out = layer_drop_agreement(sim, sens).set_index("measure")
    assert out.loc["block_influence", "spearman_rho"] == pytest.approx(1.0)
    assert out.loc["angular_distance", "spearman_rho"] == pytest.approx(0.8)
    short = layer_drop_agreement(sim, sens[sens["layer"] < 2]).set_index("measure")
    assert math.isnan(short.loc["block_influence", "spearman_rho"]) and "need 3" in short.loc["block_influence", "note"]


def _nll(model, batch) -> torch.Tensor:
    """[n] fp64 per-token NLL of a batch's scored positions (chunked head, as the evaluator scores)."""
    from esa_pipeline.core.models.adapters import adapter_for

    adapter = adapter_for(model)
    hidden = gather_scored(final_hidden_states(model, adapter, batch), batch)
    return score_hidden(model, adapter, hidden, scored_targets(batch)).nll.double()


def test_compression_study_on_a_tiny_model_produces_every_relation(tiny):
    from esa_pipeline.core.compression.study import compression_study

    lm = tiny("tiny-pythia")
    base = perplexity(lm, load_texts("bundled", max_docs=3), window=32, max_tokens=96, batch_size=3)
    out = compression_study(lm, base, layers=[0, 1], components=["attention.query", "ffn.down"], bits=(2, 4, 8),
                            sparsities=(0.25, 0.5), sparsity_target=0.5)
    sens = out["sensitivity"]
    assert sens.groupby("kind").size().to_dict() == {"quantize": 12, "prune": 8, "layer_drop": 6}
    assert sens["restored"].all()
    assert (sens[sens["kind"] == "quantize"]["group_size"] == 32).all()
    assert sens[sens["kind"] == "layer_drop"]["used_prefix_cache"].all()
    recipe = out["compression_recipe"].set_index(["kind", "allocation"])
    assert recipe["restored"].all() and len(recipe) == 4
    assert recipe.loc[("quantize", "recipe"), "achieved"] <= 4.0
    # the ILP never predicts worse than the uniform assignment it could have chosen
    assert recipe.loc[("quantize", "recipe"), "predicted_delta_nll"] <= recipe.loc[("quantize", "uniform"), "predicted_delta_nll"] + 1e-12
    assert len(out["block_influence"]) == tiny("tiny-pythia").spec.n_layers
    assert set(out["layer_drop_agreement"]["measure"]) == {"block_influence", "angular_distance"}


def test_report_shows_recipes_top_quantize_units_and_block_influence_agreement(tmp_path):
    from esa_pipeline.core.reporting.report import build_report

    recipe = pd.DataFrame([{"model": "smollm2-135m", "kind": "quantize", "allocation": "recipe", "budget": 4.0,
                            "achieved": 3.98, "predicted_delta_nll": 0.1, "measured_delta_nll": 0.13,
                            "measured_kl": 0.12, "additivity_ratio": 1.3, "ratio_ci_low": 1.1, "ratio_ci_high": 1.6,
                            "restored": True}])
    sens = pd.DataFrame({"model": "smollm2-135m", "kind": "quantize", "layer": range(8), "component": "ffn.down",
                         "strength": [3.0] * 7 + [8.0], "mode": "symmetric", "group_size": 32,
                         "delta_nll": [0.01, 0.9, 0.02, 0.8, 0.03, 0.7, 0.6, 5.0], "kl": 0.0, "relative_change": 0.1})
    agreement = pd.DataFrame([{"model": "smollm2-135m", "measure": "block_influence", "span": 1,
                               "drop_component": "block", "spearman_rho": 0.75, "p_value": 0.01, "n_layers": 30,
                               "note": ""}])
    page = build_report({"compression_recipe": recipe, "compression_sensitivity": sens,
                         "layer_drop_agreement": agreement}, tmp_path, experiment={"name": "c"}).read_text()
    section = page[page.index('id="quantize-top"'):page.index('id="block-influence"')]
    # the five largest 3-bit units (the 8-bit row is not a 3-bit unit, however large)
    assert section.count("<tr>") - 1 == 5 and "5.0" not in section
    assert "1.3" in page[page.index('id="compression-recipe"'):page.index('id="quantize-top"')]
    assert "0.75" in page[page.index('id="block-influence"'):]


def compression_fixture(names: list[str]) -> dict[str, pd.DataFrame]:
    """The compression relations the report reads, for `names`, derived through the real allocation /
    additivity / agreement code from synthetic single-unit points (for the report and chart fixtures)."""
    rng = np.random.default_rng(0)
    sens, sims, recipes = [], [], []
    for model in names:
        q = pd.DataFrame([{"model": model, "kind": "quantize", "layer": layer, "component": comp, "strength": float(b),
                           "mode": "symmetric", "group_size": 32, "delta_nll": float(rng.uniform(0, 1) / b**2),
                           "kl": 0.01, "relative_change": 0.1}
                          for layer in range(4) for comp in ("attention.query", "ffn.down") for b in (3, 4, 8)])
        drops = pd.DataFrame({"model": model, "kind": "layer_drop", "component": "block", "layer": range(4),
                              "delta_nll": [0.5, 0.1, 0.2, 0.3]})
        sens += [q, drops]
        sims.append(pd.DataFrame({"model": model, "layer": range(4), "span": 1,
                                  "block_influence": [0.4, 0.05, 0.1, 0.2], "angular_distance": [0.3, 0.1, 0.05, 0.2]}))
        points = q.rename(columns={"strength": "value"}).assign(n_params=100)
        for allocation, chosen in (("recipe", choose_allocation(points, 4.0, kind="quantize")),
                                   ("uniform", uniform_allocation(points, 4.0))):
            unit_windows = pd.concat([chosen.assign(window_id=w, delta_nll_sum=chosen["delta_nll"] * 5)
                                      for w in (0, 1)])
            measured = pd.DataFrame({"window_id": [0, 1], "n_tokens": [10, 10],
                                     "delta_nll_sum": [1.2 * chosen["delta_nll"].sum() * 5] * 2})
            check = additivity(measured, unit_windows, chosen, {0: "a", 1: "b"})
            recipes.append({"model": model, "kind": "quantize", "allocation": allocation, "budget": 4.0,
                            "achieved": achieved(chosen), **check, "measured_kl": 0.02, "restored": True})
    sens_frame = pd.concat(sens, ignore_index=True)
    return {"compression_sensitivity": sens_frame, "block_influence": pd.concat(sims, ignore_index=True),
            "layer_drop_agreement": layer_drop_agreement(pd.concat(sims, ignore_index=True), sens_frame),
            "compression_recipe": pd.DataFrame(recipes)}


def test_compression_fixture_ratios_are_the_built_in_factor():
    recipe = compression_fixture(["m"])["compression_recipe"]
    assert recipe["additivity_ratio"].tolist() == pytest.approx([1.2, 1.2])
