"""dose_response(): a planted ΔNLL ∝ σ² gives slope 2, CIs cover, non-monotone responses are flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esa_pipeline.core.analysis import DOSE_RESPONSE_COLUMNS, dose_response

SIGMAS = np.array([0.01, 0.03, 0.1, 0.3])


def sensitivity_rows(deltas_by_layer: dict[int, np.ndarray], *, kind: str = "gaussian",
                     strengths: np.ndarray = SIGMAS, seeds: int = 2) -> pd.DataFrame:
    """deltas_by_layer[layer][i] = seed-averaged ΔNLL at strengths[i] (seeds spread ±1% around it)."""
    rows = []
    for layer, deltas in deltas_by_layer.items():
        for strength, delta in zip(strengths, deltas, strict=True):
            for seed in range(seeds):
                rows.append({"model": "m", "kind": kind, "component": "ffn.down", "layer": layer, "expert": None,
                             "strength": float(strength), "seed": seed,
                             "delta_nll": delta * (1 + (0.01 if seed == 0 else -0.01))})  # fmt: skip
    return pd.DataFrame(rows)


def test_quadratic_response_has_slope_two_exactly() -> None:
    result = dose_response(sensitivity_rows({0: 0.5 * SIGMAS**2, 1: 3.0 * SIGMAS**2}))
    assert list(result.columns) == DOSE_RESPONSE_COLUMNS and len(result) == 2
    assert result["slope"].to_numpy() == pytest.approx([2.0, 2.0], abs=1e-9)
    assert result.loc[result["layer"] == 1, "intercept"].item() == pytest.approx(np.log(3.0), abs=1e-9)
    assert result["monotone"].all() and (result["n_used"] == 4).all() and (result["note"] == "").all()


def test_slope_ci_covers_the_planted_slope_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(3)
    n_cells = 300
    sigmas = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    deltas = {layer: 0.2 * sigmas**2 * np.exp(rng.normal(0, 0.2, len(sigmas))) for layer in range(n_cells)}
    result = dose_response(sensitivity_rows(deltas, strengths=sigmas))
    covered = (result["slope_ci_low"] <= 2.0) & (2.0 <= result["slope_ci_high"])
    assert abs(covered.mean() - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / n_cells)
    assert result["slope"].mean() == pytest.approx(2.0, abs=0.03)


def test_non_monotone_and_unusable_points_are_flagged_not_fitted() -> None:
    result = dose_response(sensitivity_rows({
        0: np.array([0.01, 0.5, 0.02, 0.9]),        # rises, falls, rises: not a dose-response
        1: np.array([-0.001, 0.0, 0.02, np.inf]),   # one usable point only
    }))  # fmt: skip
    wobbly = result.loc[result["layer"] == 0].iloc[0]
    assert not wobbly["monotone"] and "non-monotone" in wobbly["note"] and np.isfinite(wobbly["slope"])
    broken = result.loc[result["layer"] == 1].iloc[0]
    assert np.isnan(broken["slope"]) and broken["n_used"] == 1
    assert broken["note"].startswith("no slope: 1 usable strength(s)")
    assert "1 strength(s) with non-finite ΔNLL" in broken["note"] and "2 strength(s) with ΔNLL <= 0" in broken["note"]


def test_scale_dose_is_the_distance_of_the_gain_from_one_and_two_strengths_give_no_row() -> None:
    gains = np.array([1.05, 1.1, 1.3])
    result = dose_response(sensitivity_rows({0: 2.0 * (gains - 1) ** 2}, kind="scale", strengths=gains))
    assert result["slope"].item() == pytest.approx(2.0, abs=1e-9)
    assert result["dose_min"].item() == pytest.approx(0.05)
    assert dose_response(sensitivity_rows({0: SIGMAS[:2] ** 2}, strengths=SIGMAS[:2])).empty


def test_scale_gains_below_and_above_one_are_each_monotone_not_one_wobbly_curve() -> None:
    # The seed portfolio's gains 0.9, 0.95, 1.05, 1.1: sorted by dose |g - 1| they interleave the two sides
    # (0.95, 1.05, 0.9, 1.1), so a response growing on both sides, faster below 1, was flagged non-monotone.
    gains = np.array([0.9, 0.95, 1.05, 1.1])
    deltas = np.where(gains < 1, 2.0, 1.0) * (gains - 1) ** 2
    row = dose_response(sensitivity_rows({0: deltas}, kind="scale", strengths=gains)).iloc[0]
    assert row["monotone"] and "non-monotone" not in row["note"]
    assert row["slope"] == pytest.approx(2.0, abs=1e-9)  # one exponent on both sides, intercepts differ
    # a rise and a fall on one side is still flagged: below 1, ΔNLL at 0.95, 0.9, 0.8 is 0.01, 0.05, 0.02
    three_below = np.array([0.8, 0.9, 0.95, 1.05])
    wobbly = np.array([0.02, 0.05, 0.01, 0.01])
    assert not dose_response(sensitivity_rows({0: wobbly}, kind="scale", strengths=three_below))["monotone"].item()
