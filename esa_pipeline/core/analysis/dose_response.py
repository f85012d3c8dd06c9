"""Dose–response: how ΔNLL grows with perturbation strength, per (model, kind, component, layer).

For Gaussian noise of relative size σ on a slice, a second-order expansion of the loss gives
E[ΔNLL] ≈ ½σ²·Σ rms²·diag H (importance/prediction.py), so on log–log axes the slope of ΔNLL against σ is 2
at small σ, and departs from 2 where the quadratic regime ends. The fit is ordinary least squares of
ln(seed-averaged ΔNLL) on ln(dose) over the strengths measured (statsmodels OLS; slope CI from its t
distribution on n - 2 degrees of freedom). The dose is the strength itself, except for `scale`, whose
strength is a gain factor g around 1: there the dose is |g - 1|.

Every (model, kind, component, layer, expert) with >= 3 distinct strengths gets a row. Points with ΔNLL <= 0
or non-finite cannot enter a log fit: they are left out and counted (n_used < n_strengths); with fewer than 3
usable points there is no slope (NULL) and `note` says why. `monotone` is false when the seed-averaged ΔNLL
goes up and then down (or down and then up) as the dose grows: a response that is not a dose–response.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.regression.linear_model import OLS

from esa_pipeline.core.analysis._common import as_nullable_int
from esa_pipeline.core.analysis.consistency import layer_profiles

DOSE_RESPONSE_COLUMNS = [
    "model",
    "kind",
    "component",
    "layer",
    "n_strengths",
    "n_used",
    "dose_min",
    "dose_max",
    "slope",
    "slope_ci_low",
    "slope_ci_high",
    "intercept",
    "r2",
    "monotone",
    "note",
]
MIN_STRENGTHS = 3
# kinds whose strength is not itself a dose: the perturbation's size as a function of the stored strength
DOSE_OF_STRENGTH = {"scale": lambda s: np.abs(s - 1.0)}
# Strengths on different sides of the no-op (gains below and above 1) are two dose-response curves sharing a
# dose axis: monotonicity is judged on each side, or interleaved doses read as a rise and a fall.
SIDE_OF_STRENGTH = {"scale": lambda s: np.sign(s - 1.0)}


def dose_response(sensitivity: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """One row per (model, kind, component, layer) with >= 3 strengths: log–log slope with CI, monotone flag.

    sensitivity: the `sensitivity` relation (seed rows; averaged over seeds here, MoE experts collapsed as in
    layer_profiles). alpha sets the slope CI level (1 - alpha). Raises ValueError on a bad frame (see
    layer_profiles) or alpha outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"dose_response(): alpha must be in (0, 1), got {alpha}")
    profiles = layer_profiles(sensitivity, function="dose_response")  # seeds averaged, experts collapsed
    rows = []
    keys = ["model", "kind", "component", "layer"]
    for key, cell in profiles.groupby(keys, dropna=False, sort=True):
        strength = cell["strength"].to_numpy(dtype=float)
        if len(np.unique(strength)) < MIN_STRENGTHS:
            continue
        dose = DOSE_OF_STRENGTH.get(str(key[1]), lambda s: s)(strength)
        side = SIDE_OF_STRENGTH.get(str(key[1]), np.ones_like)(strength)
        rows.append(dict(zip(keys, key, strict=True)) | _fit(dose, cell["mean_delta_nll"].to_numpy(float), alpha, side))
    out = pd.DataFrame(rows, columns=DOSE_RESPONSE_COLUMNS)
    out["layer"] = as_nullable_int(out["layer"])
    return out


def _monotone(delta: np.ndarray) -> bool:
    """delta in dose order: not both a real rise and a real fall (ties are flat, not a change of direction)."""
    steps = np.diff(delta[np.isfinite(delta)])
    return not ((steps > 0).any() and (steps < 0).any())


def _fit(dose: np.ndarray, delta: np.ndarray, alpha: float, side: np.ndarray) -> dict:
    order = np.argsort(dose, kind="stable")
    dose, delta, side = dose[order], delta[order], side[order]
    monotone = all(_monotone(delta[side == s]) for s in np.unique(side))
    usable = np.isfinite(delta) & (delta > 0) & (dose > 0)
    result = {
        "n_strengths": len(dose),
        "n_used": int(usable.sum()),
        "dose_min": float(dose.min()),
        "dose_max": float(dose.max()),
        "slope": np.nan,
        "slope_ci_low": np.nan,
        "slope_ci_high": np.nan,
        "intercept": np.nan,
        "r2": np.nan,
        "monotone": monotone,
    }
    notes = []
    if not np.isfinite(delta).all():
        notes.append(f"{int((~np.isfinite(delta)).sum())} strength(s) with non-finite ΔNLL (loss overflowed) left out")
    if (np.isfinite(delta) & (delta <= 0)).any():
        notes.append(f"{int((np.isfinite(delta) & (delta <= 0)).sum())} strength(s) with ΔNLL <= 0 left out (no log)")
    if usable.sum() < MIN_STRENGTHS:
        notes.insert(0, f"no slope: {int(usable.sum())} usable strength(s), a log-log fit needs {MIN_STRENGTHS}")
    elif np.ptp(np.log(dose[usable])) == 0:
        notes.insert(0, "no slope: every usable strength has the same dose")
    else:
        design = np.column_stack([np.ones(int(usable.sum())), np.log(dose[usable])])  # [n, 2]
        fit = OLS(np.log(delta[usable]), design).fit()
        ci = fit.conf_int(alpha)  # [2, 2]
        result.update(
            slope=float(fit.params[1]),
            slope_ci_low=float(ci[1, 0]),
            slope_ci_high=float(ci[1, 1]),
            intercept=float(fit.params[0]),
            r2=float(fit.rsquared),
        )
    if not monotone:
        notes.append("non-monotone: ΔNLL rises and falls as the strength grows")
    result["note"] = "; ".join(notes)
    return result
