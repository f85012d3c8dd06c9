"""Adaptive token budgets: an anytime-valid confidence sequence for a point's mean per-token ΔNLL, and the rule
that stops scoring a point once its decision is made.

Method: the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas, "Time-uniform
central limit theory and asymptotic confidence sequences", Annals of Statistics 52(6), 2024 (arXiv 2103.06476),
eq. (5) — Robbins' normal-mixture boundary (Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Annals of Statistics 49(2), 2021, §3.2) with the running sample variance
plugged in:

    C_t = mean_t ± sd_t · sqrt( 2 (t ρ² + 1) / (t² ρ²) · log( sqrt(t ρ² + 1) / α ) ),
    ρ² = (−2 log α + log(−2 log α + 1)) / t*           (tightest near t = t* observations)

It is valid under optional stopping (time-uniform), so checking it after every batch and stopping when it is
narrow enough keeps the error rate ≤ α; a t-interval re-checked after every batch does not. It is asymptotic
(the variance is estimated), which is why a point never stops before `min_units` observations. Simulated here
(2000 i.i.d. streams of 200 observations, checked after every one; `simulate_misses`), the sequence missed the
true mean on

    first check after     8      16     24 observations
    Gaussian            4.8 %  3.2 %  2.4 %
    Student-t5          5.8 %  3.8 %  3.0 %

hence the default of 16 (the smallest with both ≤ α = 5 %; `test_sequential.py` re-runs it).

Why not the `confseq` package (the reference code of Howard et al.): its 0.0.11 release builds its boundaries from
C++ that needs Boost headers absent on these machines (the sdist fails to build: "Could NOT find Boost"), and its
pure-Python sequences (predmix, betting) require observations bounded in a known interval, which per-token ΔNLL is
not. The closed form above is 10 lines and is checked for coverage under optional stopping in the tests.

Estimand and observation unit: the sequence covers the mean per-token ΔNLL of the fixed budget's windows, the
number a fixed-budget sweep of the same windows reports (sum of their ΔNLL over sum of their tokens). The unit is
the WINDOW: a point visits the budget's windows in a seeded, uniformly random order (`adaptive.visit_ordered`),
so the windows scored so far are a sample WITHOUT replacement from that finite population, whatever the
dependence between windows of one document; the sequence needs no document-level assumption. Windows can differ
in length (a document's short tail window), so a window enters as y_w = D_w / n̄ (D_w its summed ΔNLL, n̄ the
budget's mean tokens per window, `window_observations`): the population mean of y_w is exactly the token-weighted
mean, with no ratio approximation. Sampling without replacement makes the with-replacement boundary above
conservative (Waudby-Smith & Ramdas, "Confidence sequences for sampling without replacement", NeurIPS 2020,
arXiv 2006.04347: the mean of a random-order prefix concentrates at least as fast as an i.i.d. mean, Hoeffding
1963 §6, and sequences built for it shrink to zero width at the population size); checked here, not assumed, by
replaying random visit orders of finite populations (`wor_misses`; 64 windows, checked after every batch of 8):

    population (64 windows of 25 documents)                         random order   document order
    Gaussian document effects + small window noise (corr. 0.96)       0.6 %           11.6 %
    i.i.d. Gaussian / Student-t5 windows (200 populations)            0.4 / 0.3 %     -
    lognormal (skewed) document effects, corr. ~0.96 (100 pops.)      5.9 % mean, 28 % worst

A random order is what makes the rule valid (the document-ordered visit breaks it); strongly skewed populations
dominated by a few documents are the asymptotic sequence's weak point (its variance estimate from the first
windows misses the rare extreme ones). On real points, `benchmarks/bench_adaptive.py` runs the same check on every
fixed point's per-window ΔNLL (its "permutation check": 2000 random visit orders per point). SmolLM2-135M, 84
gaussian points (12 layers x 3 components, 50 windows of 128 tokens, batches of 4): the sequence ever excluded the
fixed-budget mean on 1.1 % of orders on average, but above α on 3 points (worst 31.8 %: layer 0 attention.query
σ = 0.001, ΔNLL 2e-6, one window 6.7 sd from the mean); at the rule's stop it excluded it on 0.3 % (worst 8.5 %),
and never by more than abs_tolerance (the misses are by ~1e-6 nats).
Generalising beyond the sampled documents stays the job of the downstream document-clustered significance
analysis (`core/analysis/significance.py`), which uses the stored windows that were scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STOP_RESOLVED = "effect_resolved"  # the sequence excludes 0 and is narrow relative to the estimate
STOP_NEGLIGIBLE = "practically_zero"  # the sequence lies within ±abs_tolerance of its centre: effect too small to matter
STOP_BUDGET = "budget_spent"  # every window of the fixed budget was scored
STOP_NON_FINITE = "non_finite"  # a scored window's ΔNLL is inf or NaN: no further window can make the mean finite
STOP_REASONS = (STOP_RESOLVED, STOP_NEGLIGIBLE, STOP_BUDGET, STOP_NON_FINITE)


@dataclass(frozen=True)
class SequentialRule:
    """When a point may stop scoring windows. Units: ΔNLL in nats per token.

    alpha: error rate of the confidence sequence (two-sided). rel_precision: stop (a) once the sequence excludes
    0 and its half-width ≤ rel_precision · |estimate|. abs_tolerance: stop (b) once the half-width ≤ this.
    min_units: windows scored before any stop (the variance estimate needs a few; chosen by the simulations in
    the module docstring). design_units: t*, the number of windows at which the boundary is tightest.
    """

    alpha: float = 0.05
    rel_precision: float = 0.25
    abs_tolerance: float = 0.002
    min_units: int = 16
    design_units: int = 32

    def __post_init__(self) -> None:
        checks = {
            "alpha": 0 < self.alpha < 1,
            "rel_precision": math.isfinite(self.rel_precision) and self.rel_precision > 0,
            "abs_tolerance": math.isfinite(self.abs_tolerance) and self.abs_tolerance >= 0,
            "min_units": isinstance(self.min_units, int) and not isinstance(self.min_units, bool)
            and self.min_units >= 2,
            "design_units": isinstance(self.design_units, int) and not isinstance(self.design_units, bool)
            and self.design_units >= 1,
        }  # fmt: skip
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"SequentialRule: invalid {', '.join(bad)} (alpha in (0, 1), rel_precision > 0, abs_tolerance ≥ 0, "
                f"min_units ≥ 2 and design_units ≥ 1 integers): got {self}"
            )


@dataclass(frozen=True)
class SequenceState:
    """The confidence sequence after `n_units` windows: estimate and bounds in nats per token."""

    n_units: int
    estimate: float
    lower: float
    upper: float

    @property
    def half_width(self) -> float:
        return (self.upper - self.lower) / 2


def mixture_half_width(n: int, sd: float, alpha: float, design_units: int) -> float:
    """Half-width of the asymptotic normal-mixture confidence sequence after n observations with sample sd.

    Returns inf for n < 2 (no variance estimate). Source: Waudby-Smith et al. 2024, eq. (5).
    """
    if n < 2 or not math.isfinite(sd):
        return math.inf
    log_term = -2 * math.log(alpha)
    rho2 = (log_term + math.log(log_term + 1)) / design_units
    t_rho2 = n * rho2
    return sd * math.sqrt(2 * (t_rho2 + 1) / (n * n * rho2) * math.log(math.sqrt(t_rho2 + 1) / alpha))


def sequence_state(units: Sequence[float], rule: SequentialRule) -> SequenceState:
    """The sequence over window observations `units` (`window_observations`, nats per token)."""
    x = np.asarray(units, dtype=np.float64)  # [n]
    n = len(x)
    if n == 0:
        return SequenceState(0, math.nan, -math.inf, math.inf)
    if not np.isfinite(x).all():
        # An overflowed (+inf) or undefined (NaN) loss ends the point: the bounds are the mean itself, as measured
        # (+inf, -inf or NaN), never a finite stand-in and never a claim that a NaN effect was resolved.
        estimate = float(x.mean())
        return SequenceState(n, estimate, estimate, estimate)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n >= 2 else math.nan
    half = mixture_half_width(n, sd, rule.alpha, rule.design_units)
    return SequenceState(n, mean, mean - half, mean + half)


def stop_reason(state: SequenceState, rule: SequentialRule) -> str | None:
    """STOP_RESOLVED, STOP_NEGLIGIBLE, STOP_NON_FINITE, or None to keep scoring (the caller stops with
    STOP_BUDGET at the end)."""
    if state.n_units > 0 and not math.isfinite(state.estimate):
        return STOP_NON_FINITE
    if state.n_units < rule.min_units:
        return None
    excludes_zero = state.lower > 0 or state.upper < 0
    if excludes_zero and state.half_width <= rule.rel_precision * abs(state.estimate):
        return STOP_RESOLVED
    if state.half_width <= rule.abs_tolerance:
        return STOP_NEGLIGIBLE
    return None


def window_observations(delta_nll_sums: Sequence[float], mean_tokens: float) -> list[float]:
    """The sequence's observations y_w = D_w / n̄ of windows with summed ΔNLL D_w (nats), n̄ the fixed budget's
    mean scored tokens per window. Over the whole budget, mean(y_w) = sum(D_w) / sum(n_w): the token-weighted
    mean per-token ΔNLL exactly, even when windows differ in length (a per-window mean D_w / n_w would weight a
    short tail window like a full one)."""
    if not mean_tokens > 0:
        raise ValueError(f"mean_tokens must be > 0, got {mean_tokens}")
    return [d / mean_tokens for d in delta_nll_sums]


def running_states(units: Sequence[float], rule: SequentialRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, lower, upper) after each of the first 1..n finite observations, vectorised: [n] each."""
    x = np.asarray(units, dtype=np.float64)  # [n]
    n = np.arange(1, len(x) + 1, dtype=np.float64)  # [n]
    mean = np.cumsum(x) / n  # [n]
    sq = np.cumsum(x * x)  # [n]
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n >= 2, (sq - n * mean**2) / (n - 1), np.nan)  # [n]
    sd = np.sqrt(np.clip(var, 0, None))
    log_term = -2 * math.log(rule.alpha)
    rho2 = (log_term + math.log(log_term + 1)) / rule.design_units
    with np.errstate(invalid="ignore", divide="ignore"):
        half = sd * np.sqrt(2 * (n * rho2 + 1) / (n * n * rho2) * np.log(np.sqrt(n * rho2 + 1) / rule.alpha))
    half = np.where(n >= 2, half, np.inf)
    return mean, mean - half, mean + half


def simulate_false_stops(
    rule: SequentialRule, *, n_streams: int, max_units: int, seed: int, df: float = 5.0, scale: float = 0.01
) -> float:
    """Fraction of null streams (true mean 0, Student-t noise with `df` degrees of freedom) on which the rule
    stops with STOP_RESOLVED, i.e. declares an effect that is not there, checking after every unit."""
    rng = np.random.default_rng(seed)
    false_stops = 0
    for _ in range(n_streams):
        x = rng.standard_t(df, size=max_units) * scale  # [max_units]
        est, lo, hi = running_states(x, rule)
        half = (hi - lo) / 2
        eligible = np.arange(1, max_units + 1) >= rule.min_units
        resolved = eligible & ((lo > 0) | (hi < 0)) & (half <= rule.rel_precision * np.abs(est))
        negligible = eligible & (half <= rule.abs_tolerance)
        first_resolved = np.argmax(resolved) if resolved.any() else max_units
        first_negligible = np.argmax(negligible) if negligible.any() else max_units
        false_stops += first_resolved < max_units and first_resolved <= first_negligible
    return false_stops / n_streams


def misses(values: np.ndarray, target: float, rule: SequentialRule, *, batch_size: int = 1) -> np.ndarray:
    """For streams `values` [streams, n]: whether the sequence, checked after every `batch_size` observations
    (and after the last) from `rule.min_units` on, EVER excluded `target` — a coverage failure under optional
    stopping. Returns [streams] bool."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))  # [streams, n]
    n = values.shape[1]
    checked = np.arange(1, n + 1)
    checked = ((checked % batch_size == 0) | (checked == n)) & (checked >= rule.min_units)  # [n]
    out = np.zeros(len(values), dtype=bool)
    for row, x in enumerate(values):
        _, lo, hi = running_states(x, rule)
        out[row] = bool(((lo > target) | (hi < target))[checked].any())
    return out


def simulate_misses(rule: SequentialRule, *, n_streams: int, max_units: int, seed: int,
                    df: float | None = None) -> float:  # fmt: skip
    """Fraction of i.i.d. streams (Gaussian, or Student-t with `df` degrees of freedom) whose sequence ever
    excludes the true mean when checked after every observation: the with-replacement coverage failure rate."""
    rng = np.random.default_rng(seed)
    shape = (n_streams, max_units)
    x = rng.standard_normal(shape) if df is None else rng.standard_t(df, size=shape)  # [streams, units]
    return float(misses(x, 0.0, rule).mean())


def random_orders(n: int, n_orders: int, seed: int) -> np.ndarray:
    """[n_orders, n] uniformly random permutations of 0..n-1."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_orders, n)), axis=1)


def wor_misses(population: np.ndarray, orders: np.ndarray, rule: SequentialRule, *, batch_size: int) -> float:
    """Fraction of visit `orders` [n_orders, N] of a finite `population` [N] of window observations on which the
    sequence, checked after every batch, ever excludes the population mean (the fixed-budget value): the
    without-replacement coverage failure rate of the adaptive rule. A random order must keep it ≤ α."""
    population = np.asarray(population, dtype=np.float64)  # [N]
    return float(misses(population[orders], float(population.mean()), rule, batch_size=batch_size).mean())


def wor_stop_errors(population: np.ndarray, orders: np.ndarray, rule: SequentialRule, *,
                    batch_size: int) -> dict[str, float]:  # fmt: skip
    """The adaptive rule replayed on visit `orders` [n_orders, N] of a finite `population` [N] of window
    observations, checked after every batch. Fractions of orders on which, with μ the population (fixed-budget)
    mean:
    - "ever": the sequence excluded μ at some check (the time-uniform guarantee; `wor_misses`);
    - "at_stop": the sequence excluded μ when the rule stopped (the guarantee optional stopping relies on);
    - "beyond_tolerance": at the stop, μ lay more than `rule.abs_tolerance` outside the sequence (an error large
      enough to matter for either stop reason);
    plus "mean_stop_fraction", the mean fraction of the population scored."""
    population = np.asarray(population, dtype=np.float64)  # [N]
    mu = float(population.mean())
    n = len(population)
    index = np.arange(1, n + 1)
    checked = ((index % batch_size == 0) | (index == n)) & (index >= rule.min_units)  # [N]
    ever = at_stop = beyond = 0
    used = 0.0
    for order in orders:
        est, lo, hi = running_states(population[order], rule)
        half = (hi - lo) / 2
        resolved = ((lo > 0) | (hi < 0)) & (half <= rule.rel_precision * np.abs(est))
        stops = checked & (resolved | (half <= rule.abs_tolerance))
        stop = int(np.argmax(stops)) if stops.any() else n - 1
        ever += bool(((lo > mu) | (hi < mu))[checked].any())
        at_stop += bool(lo[stop] > mu or hi[stop] < mu)
        beyond += bool(lo[stop] - mu > rule.abs_tolerance or mu - hi[stop] > rule.abs_tolerance)
        used += (stop + 1) / n
    k = len(orders)
    return {"ever": ever / k, "at_stop": at_stop / k, "beyond_tolerance": beyond / k, "mean_stop_fraction": used / k}
