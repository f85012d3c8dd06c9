"""The adaptive stopping rule on synthetic streams whose true mean is known."""

import math

import numpy as np
import pytest
from scipy import stats

from esa_pipeline.core.evaluation.sequential import (
    STOP_NEGLIGIBLE,
    STOP_NON_FINITE,
    STOP_RESOLVED,
    SequentialRule,
    mixture_half_width,
    random_orders,
    running_states,
    sequence_state,
    simulate_false_stops,
    simulate_misses,
    stop_reason,
    window_observations,
    wor_misses,
    wor_stop_errors,
)

RULE = SequentialRule(alpha=0.05, rel_precision=0.25, abs_tolerance=0.002, min_units=16, design_units=32)


def test_false_stop_rate_under_optional_stopping_stays_below_alpha():
    # Null streams, checked after every window: declaring an effect is a false stop.
    rate = simulate_false_stops(RULE, n_streams=2000, max_units=200, seed=0)
    assert rate <= RULE.alpha


def test_a_t_interval_rechecked_after_every_unit_is_not_anytime_valid():
    # The reason for a confidence sequence: the same optional stopping with a fixed-n t-interval errs far more
    # often than alpha (a check that the simulation can detect invalid intervals at all).
    rng = np.random.default_rng(0)
    x = rng.standard_t(5, size=(1000, 200)) * 0.01  # [streams, units]
    n = np.arange(1, 201)
    mean = np.cumsum(x, axis=1) / n
    sd = np.sqrt((np.cumsum(x * x, axis=1) - n * mean**2) / np.maximum(n - 1, 1))
    half = stats.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    rejects = (np.abs(mean) > half)[:, RULE.min_units - 1 :]
    assert rejects.any(axis=1).mean() > 2 * RULE.alpha


def test_the_sequence_covers_the_true_mean_at_every_time():
    rng = np.random.default_rng(1)
    misses = 0
    for _ in range(1000):
        x = 0.3 + rng.normal(0, 0.05, size=200)
        _, lo, hi = running_states(x, RULE)
        misses += bool(((lo > 0.3) | (hi < 0.3))[RULE.min_units - 1 :].any())
    assert misses / 1000 <= RULE.alpha


def test_a_clear_effect_stops_resolved_early_with_the_true_mean_inside():
    rng = np.random.default_rng(2)
    x = 0.1 + rng.normal(0, 0.02, size=400)
    for n in range(1, 401):
        state = sequence_state(x[:n], RULE)
        reason = stop_reason(state, RULE)
        if reason:
            break
    assert reason == STOP_RESOLVED
    assert n < 2 * RULE.min_units
    assert state.lower <= 0.1 <= state.upper
    assert state.half_width <= 0.25 * abs(state.estimate)


def test_a_negligible_effect_stops_as_practically_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.001, size=400)
    reasons = [stop_reason(sequence_state(x[:n], RULE), RULE) for n in range(1, 401)]
    first = next(r for r in reasons if r)
    assert first == STOP_NEGLIGIBLE


def test_no_stop_before_min_units_and_overflow_stops_at_once():
    x = list(np.random.default_rng(5).normal(0.5, 0.001, size=RULE.min_units))
    assert stop_reason(sequence_state(x[:-1], RULE), RULE) is None
    assert stop_reason(sequence_state(x, RULE), RULE) == STOP_RESOLVED
    inf = sequence_state([0.1, math.inf], RULE)
    assert stop_reason(inf, RULE) == STOP_NON_FINITE
    assert (inf.estimate, inf.lower, inf.upper) == (math.inf, math.inf, math.inf)


def test_a_nan_window_stops_as_non_finite_with_nan_bounds_not_as_a_resolved_effect():
    nan = sequence_state([0.1, math.nan, 0.2], RULE)
    assert stop_reason(nan, RULE) == STOP_NON_FINITE
    assert all(math.isnan(v) for v in (nan.estimate, nan.lower, nan.upper))
    mixed = sequence_state([math.inf, -math.inf], RULE)  # inf - inf: undefined, recorded as NaN
    assert stop_reason(mixed, RULE) == STOP_NON_FINITE and math.isnan(mixed.estimate)


def test_half_width_matches_the_closed_form_by_hand():
    # alpha = 0.05, t* = 32, n = 10, sd = 1: the formula evaluated step by step.
    log_term = -2 * math.log(0.05)
    rho2 = (log_term + math.log(log_term + 1)) / 32
    expected = math.sqrt(2 * (10 * rho2 + 1) / (100 * rho2) * math.log(math.sqrt(10 * rho2 + 1) / 0.05))
    assert mixture_half_width(10, 1.0, 0.05, 32) == pytest.approx(expected, rel=1e-12)
    assert mixture_half_width(1, 1.0, 0.05, 32) == math.inf
    # wider than the fixed-n 95% normal interval at every n (the price of validity at all times)
    for n in (10, 32, 100, 1000):
        assert mixture_half_width(n, 1.0, 0.05, 32) > 1.96 / math.sqrt(n)


def test_window_observations_average_to_the_token_weighted_mean():
    # windows of 512, 512 and a 100-token tail: the per-window means would weight the tail like a full window
    sums, tokens = [51.2, 25.6, 50.0], [512, 512, 100]
    y = window_observations(sums, sum(tokens) / len(tokens))
    assert np.mean(y) == pytest.approx(sum(sums) / sum(tokens), rel=1e-12)
    assert np.mean(np.divide(sums, tokens)) != pytest.approx(sum(sums) / sum(tokens), rel=1e-3)
    with pytest.raises(ValueError, match="mean_tokens"):
        window_observations(sums, 0.0)


def test_the_default_min_units_is_the_smallest_simulated_one_with_coverage():
    # The docstring's table: checked after every observation, 16 keeps both Gaussian and t5 streams under alpha,
    # 8 does not (t5 misses more often than alpha): the variance estimate needs a few observations first.
    for df in (None, 5):
        assert simulate_misses(RULE, n_streams=2000, max_units=200, seed=0, df=df) <= RULE.alpha
    assert simulate_misses(SequentialRule(min_units=8), n_streams=2000, max_units=200, seed=0, df=5) > RULE.alpha


def clustered_population(n_docs: int = 25, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """64 windows of 25 documents (14 with 3 windows, 11 with 2) whose values share a strong document effect
    (sd 1) plus small window noise (sd 0.2): within-document correlation ~0.96. Returns (values, doc index)."""
    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(n_docs), [3] * 14 + [2] * 11)  # [64]
    return rng.standard_normal(n_docs)[docs] + 0.2 * rng.standard_normal(len(docs)), docs


def test_a_random_visit_order_covers_the_fixed_budget_mean_of_a_clustered_population():
    # Sampling windows without replacement in a uniformly random order needs no independence between windows of a
    # document: the sequence, checked after every batch of 8, covers the population (fixed-budget) mean.
    values, _ = clustered_population()
    rate = wor_misses(values, random_orders(len(values), 2000, seed=0), RULE, batch_size=8)
    assert rate <= RULE.alpha


def test_a_document_ordered_visit_breaks_coverage():
    # The same population visited document by document (documents in random order, each one's windows together):
    # early batches hold few documents, the within-document correlation hides the spread, and the sequence
    # excludes the population mean far more often than alpha. Without a random window order the rule is invalid.
    values, docs = clustered_population()
    rng = np.random.default_rng(2)
    orders = np.array([np.concatenate([np.flatnonzero(docs == d) for d in rng.permutation(25)])
                       for _ in range(2000)])  # fmt: skip
    assert wor_misses(values, orders, RULE, batch_size=8) > 2 * RULE.alpha


def test_without_replacement_the_with_replacement_sequence_is_conservative():
    # i.i.d. Gaussian and t5 populations of 64 windows, 200 of each, 100 random orders each: the miss rate under
    # sampling without replacement stays below that of i.i.d. streams of the same length (and below alpha).
    rng = np.random.default_rng(3)
    for df in (None, 5):
        pops = [rng.standard_normal(64) if df is None else rng.standard_t(df, size=64) for _ in range(200)]
        wor = np.mean([wor_misses(x, random_orders(64, 100, seed=k), RULE, batch_size=1) for k, x in enumerate(pops)])
        iid = simulate_misses(RULE, n_streams=2000, max_units=64, seed=4, df=df)
        assert wor <= iid and wor <= RULE.alpha


@pytest.mark.parametrize(
    "kwargs", [{"alpha": 0}, {"alpha": 1.5}, {"rel_precision": math.inf}, {"min_units": 1}, {"min_units": True},
               {"abs_tolerance": -1.0}, {"design_units": 0}],
)  # fmt: skip
def test_invalid_rules_are_refused(kwargs):
    with pytest.raises(ValueError, match="SequentialRule"):
        SequentialRule(**kwargs)


def test_running_states_equal_the_one_shot_state_at_every_n():
    x = np.random.default_rng(4).normal(0.05, 0.02, size=30)
    est, lo, hi = running_states(x, RULE)
    for n in (2, 8, 30):
        state = sequence_state(x[:n], RULE)
        assert (est[n - 1], lo[n - 1], hi[n - 1]) == pytest.approx((state.estimate, state.lower, state.upper))


def test_replaying_the_rule_reports_misses_ever_at_stop_and_beyond_tolerance():
    # A population whose mean is dominated by one extreme window: until that window is drawn, the estimated
    # variance cannot see it, so the sequence can exclude the population mean (by far less than abs_tolerance).
    population = np.full(50, 1e-5)
    population[::2] = -1e-5
    population[7] = 2e-3
    orders = random_orders(50, 500, seed=0)
    errors = wor_stop_errors(population, orders, RULE, batch_size=4)
    assert errors["ever"] > RULE.alpha and errors["ever"] >= errors["at_stop"] and errors["beyond_tolerance"] == 0
    assert errors["mean_stop_fraction"] == pytest.approx(16 / 50)  # negligible at the first allowed check
    assert errors["ever"] == pytest.approx(wor_misses(population, orders, RULE, batch_size=4))
    # a well-behaved population: no misses of any kind
    calm = np.random.default_rng(0).normal(0.01, 0.001, size=50)
    assert wor_stop_errors(calm, orders, RULE, batch_size=4)["ever"] <= RULE.alpha
