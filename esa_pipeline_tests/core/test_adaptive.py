"""Adaptive token budgets on a real forward pass: stopped points pair exactly with the baseline's windows."""

import math

import pytest
import torch

from esa_pipeline.core import Perturbation, evaluate_against, load_model, perplexity
from esa_pipeline.core.evaluation.adaptive import visit_ordered, window_order
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.sequential import (
    STOP_BUDGET,
    STOP_NEGLIGIBLE,
    STOP_NON_FINITE,
    SequentialRule,
)
from esa_pipeline.core.evaluation.sweep import run_sweep
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.adapters import adapter_for


@pytest.fixture(scope="module")
def setup():
    lm = load_model("tiny-llama")
    base = perplexity(lm, load_texts("bundled"), window=32, max_tokens=32 * 75, batch_size=4)
    return lm, base


def test_with_no_early_stop_the_adaptive_point_equals_the_fixed_budget_point(setup):
    lm, base = setup
    p = Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=0.5, seed=1)
    fixed = evaluate_against(lm, base, p)
    never = SequentialRule(min_units=base.n_windows + 1)
    adaptive = evaluate_against(lm, base, p, rule=never)
    assert adaptive.stop_reason == STOP_BUDGET and fixed.stop_reason == "fixed_budget"
    assert adaptive.n_tokens == fixed.n_tokens == base.n_tokens
    assert adaptive.batches_used == fixed.batches_used == math.ceil(base.n_windows / 4)
    # the same tokens in other batches: equal up to float32 batch-composition rounding
    assert adaptive.delta_nll == pytest.approx(fixed.delta_nll, rel=1e-5, abs=1e-7)
    assert adaptive.kl == pytest.approx(fixed.kl, rel=1e-4)
    assert sorted(adaptive.windows["window_id"]) == sorted(fixed.windows["window_id"])
    assert adaptive.cs_windows == base.n_windows
    # every window enters once, weighted by its tokens: the sequence's centre is the token-weighted mean
    assert (adaptive.cs_lower + adaptive.cs_upper) / 2 == pytest.approx(adaptive.delta_nll, rel=1e-9)


def test_an_early_stop_scores_fewer_windows_and_stores_exactly_those(setup):
    lm, base = setup
    p = Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=0.001, seed=1)
    rule = SequentialRule(min_units=4, abs_tolerance=0.002)
    fixed = evaluate_against(lm, base, p)
    adaptive = evaluate_against(lm, base, p, rule=rule)
    assert adaptive.stop_reason == STOP_NEGLIGIBLE
    assert adaptive.n_tokens < base.n_tokens and adaptive.batches_used < fixed.batches_used
    assert adaptive.restored is True
    scored = adaptive.windows.set_index("window_id")
    assert int(scored["n_tokens"].sum()) == adaptive.n_tokens
    # the same windows carry the same paired differences as in the fixed run (exact pairing)
    reference = fixed.windows.set_index("window_id").loc[scored.index]
    assert scored["delta_nll_sum"].to_numpy() == pytest.approx(reference["delta_nll_sum"].to_numpy(), abs=1e-9)
    assert adaptive.delta_nll == pytest.approx(scored["delta_nll_sum"].sum() / scored["n_tokens"].sum(), rel=1e-9)
    assert adaptive.cs_lower <= adaptive.cs_upper and adaptive.cs_upper - adaptive.cs_lower <= 2 * 0.002
    assert adaptive.cs_windows == len(scored)
    # the scored windows are the first ones of the seeded random visit order, a batch at a time
    order = [base.token_windows[i].window_id for i in window_order(base.n_windows)]
    assert list(scored.index) == order[: len(scored)] and len(scored) == 4 * adaptive.batches_used
    assert len({base.token_windows[i].doc_id for i in window_order(base.n_windows)[:8]}) >= 6  # spread over docs


def test_visit_order_permutes_windows_scores_and_hidden_states_together(setup):
    _, base = setup
    visit = visit_ordered(base)
    assert visit.visit_seed == 0 and visit_ordered(visit) is visit
    assert sorted(w.window_id for w in visit.token_windows) == [w.window_id for w in base.token_windows]
    offsets = {w.window_id: sum(x.n_scored for x in base.token_windows[:i]) for i, w in enumerate(base.token_windows)}
    at = 0
    for w in visit.token_windows:
        a = offsets[w.window_id]
        assert torch.equal(visit.scores.nll[at : at + w.n_scored], base.scores.nll[a : a + w.n_scored])
        assert torch.equal(visit.final_hidden[at : at + w.n_scored], base.final_hidden[a : a + w.n_scored])
        at += w.n_scored
    assert list(visit.windows["window_id"]) == [w.window_id for w in visit.token_windows]
    assert [b.window_ids for b in visit.batches()][0] == [w.window_id for w in visit.token_windows[:4]]
    with pytest.raises(ValueError, match="seed 0"):
        visit_ordered(visit, seed=1)


def test_adaptive_points_use_the_prefix_cache_of_the_visit_order(setup):
    lm, base = setup
    p = Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=0.5, seed=1)
    rule = SequentialRule(min_units=base.n_windows + 1)
    visit_cache = PrefixCache.build(lm, visit_ordered(base), adapter_for(lm.model))
    cached = evaluate_against(lm, base, p, cache=visit_cache, rule=rule)
    uncached = evaluate_against(lm, base, p, rule=rule)
    assert cached.used_prefix_cache and not uncached.used_prefix_cache and cached.restored
    assert cached.delta_nll == pytest.approx(uncached.delta_nll, rel=1e-5, abs=1e-7)
    document_cache = PrefixCache.build(lm, base, visit_cache.adapter)
    with pytest.raises(ValueError, match="visit-ordered baseline"):
        evaluate_against(lm, base, p, cache=document_cache, rule=rule)
    with pytest.raises(ValueError, match="visit-ordered baseline"):
        run_sweep(lm, base, [p], cache=document_cache, rule=rule)


def test_run_sweep_records_the_budget_used_on_every_row(setup):
    lm, base = setup
    specs = [Perturbation(kind="gaussian", component="ffn.down", layer=layer, strength=0.001, seed=1)
             for layer in (0, 1)]  # fmt: skip
    rows, windows = run_sweep(lm, base, specs, rule=SequentialRule(min_units=4))
    assert set(rows["stop_reason"]) <= {"effect_resolved", "practically_zero", "budget_spent"}
    assert (rows["n_tokens"] <= base.n_tokens).all() and rows["batches_used"].notna().all()
    per_point = windows.groupby("layer")["n_tokens"].sum()
    assert per_point.to_dict() == dict(zip(rows["layer"], rows["n_tokens"], strict=True))


def test_window_order_is_a_seeded_permutation():
    assert sorted(window_order(10)) == list(range(10))
    assert window_order(10) == window_order(10) != list(range(10))
    assert window_order(10, seed=1) != window_order(10)


def test_adaptive_budgets_come_from_yaml_and_are_on_in_standard(tmp_path):
    from esa_pipeline.core.config import ConfigError, load_experiment, model_plan

    standard = load_experiment("standard", check_models=False)
    assert standard.adaptive.enabled and standard.adaptive.rule().min_units == 16
    smoke = load_experiment("smoke", check_models=False)
    assert smoke.adaptive.rule() is None
    text = (tmp_path / "x.yaml")
    raw = open(load_experiment.__globals__["experiment_path"]("smoke")).read()
    text.write_text(raw + "\nadaptive: {enabled: true, rel_precision: 0.1, min_windows: 4}\n")
    cfg = load_experiment(text, check_models=False)
    rule = model_plan(cfg, "tiny-llama").adaptive.rule()
    assert (rule.rel_precision, rule.min_units, rule.alpha) == (0.1, 4, 0.05)
    text.write_text(raw + "\nadaptive: {enabled: true, min_windows: 1}\n")
    with pytest.raises(ConfigError, match="adaptive.min_windows"):
        load_experiment(text, check_models=False)


def test_the_report_summarises_tokens_used_per_point():
    import pandas as pd

    from esa_pipeline.core.reporting.report import token_budget_summary

    rows = pd.DataFrame({
        "model": ["m"] * 4, "kind": ["gaussian"] * 4, "n_tokens": [1000, 400, 600, 1000],
        "stop_reason": ["budget_spent", "practically_zero", "practically_zero", None],
    })  # fmt: skip
    out = token_budget_summary(rows).set_index("stop_reason")
    assert out.loc["practically_zero", "points"] == 2 and out.loc["practically_zero", "tokens_median"] == 500
    assert out.loc["practically_zero", "budget_fraction"] == 0.5
    assert out.loc["fixed_budget", "tokens_max"] == 1000  # rows stored before adaptive budgets existed


def test_the_budget_fraction_is_of_the_fixed_budget_when_every_point_stopped_early():
    # budget_tokens was the model's largest point: with every point stopped early (adaptive's success case) the
    # fraction was taken of that point, not of the budget (1536 instead of 2048 tokens in a tiny-llama run)
    import pandas as pd

    from esa_pipeline.core.reporting.report import token_budget_summary

    rows = pd.DataFrame({"model": ["m", "m", "n"], "dataset": ["bundled"] * 3, "window_tokens": [64] * 3,
                         "kind": ["gaussian"] * 3, "n_tokens": [256, 1536, 256],
                         "stop_reason": ["practically_zero"] * 3})  # fmt: skip
    baselines = pd.DataFrame({"model": ["m", "m"], "dataset": ["bundled", "wikitext"], "window_tokens": [64, 64],
                              "n_tokens": [2048, 4096]})  # fmt: skip
    out = token_budget_summary(rows, baselines).set_index("model")
    assert out.loc["m", "budget_tokens"] == 2048 and out.loc["m", "budget_fraction"] == (256 + 1536) / 2 / 2048
    assert out.loc["n", "budget_tokens"] == 256  # no baseline row: the largest point, as before


def test_a_nan_loss_stops_the_point_as_non_finite_with_nan_bounds(setup):
    lm, base = setup
    # a norm gain of 1e20 overflows fp32 activations: inf - inf -> NaN logits on the first batch
    boom = Perturbation("scale", "norm.input", 0, 1e20, 1)
    rule = SequentialRule(min_units=4)
    result = evaluate_against(lm, base, boom, rule=rule)
    assert result.stop_reason == STOP_NON_FINITE and result.batches_used == 1 and result.restored is True
    assert result.nonfinite and math.isnan(result.delta_nll)
    assert math.isnan(result.cs_lower) and math.isnan(result.cs_upper)
