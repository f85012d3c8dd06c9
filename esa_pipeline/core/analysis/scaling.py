"""Does sensitivity scale with model size? A log-log OLS fit across models.

For each (kind, component, strength) a model's sensitivity is its mean ΔNLL over seeds and measured layers.
The fit is ln(mean ΔNLL) = intercept + exponent · ln(params), by ordinary least squares, once with total and
once with active parameters (they differ only for MoE models), so mean ΔNLL ≈ e^intercept · params^exponent.

With a handful of models a high R² is cheap: r2_required_p05 is the R² that a slope test at p < 0.05 needs at
this n (from t² = (n - 2) r² / (1 - r²): r² = t²/(t² + n - 2) with t the two-sided 5% critical value on n - 2
degrees of freedom). Every cell gets a row: with fewer than 3 usable models there is no fit (NaN columns),
and `warnings` says why, so an empty or meaningless result is never silent.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.regression.linear_model import OLS

from esa_pipeline.core.analysis._common import models_frame, nan_propagating_mean, require_known_models
from esa_pipeline.core.analysis.consistency import layer_profiles

SCALING_COLUMNS = [
    "kind",
    "component",
    "strength",
    "param_basis",
    "n_models",
    "models",
    "exponent",
    "exponent_ci_low",
    "exponent_ci_high",
    "intercept",
    "r2",
    "r2_required_p05",
    "p_value",
    "warnings",
]
PARAM_BASES = {"total": "params_total", "active": "params_active"}
MIN_POINTS_FOR_FIT = 3  # a line through 2 points has no residual: no CI, no p-value


@functools.lru_cache(maxsize=256)
def r2_required(n_models: int, alpha: float = 0.05) -> float:
    """The R² a log-log fit over n_models points needs for a two-sided slope p-value below alpha."""
    if n_models < MIN_POINTS_FOR_FIT:
        return float("nan")
    dof = n_models - 2
    t = stats.t.ppf(1 - alpha / 2, dof)
    return float(t**2 / (t**2 + dof))


def scaling_fit(
    sensitivity: pd.DataFrame,
    models: pd.DataFrame,
    *,
    min_models: int = 3,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per (kind, component, strength, param_basis) with the log-log fit and plain-language warnings.

    `models` is the `models` relation (params_total, params_active, family, vocab_size, random_weights).
    Models with mean ΔNLL <= 0 or non-finite cannot enter a log fit and are dropped (warned, with names).
    Below min_models usable models the fit is still reported when possible (n >= 3) but warned about.
    `alpha` sets the exponent CI level (1 - alpha); r2_required_p05 is always at p < 0.05.
    """
    if min_models < MIN_POINTS_FOR_FIT:
        raise ValueError(
            f"scaling_fit(): min_models must be >= {MIN_POINTS_FOR_FIT}, got {min_models}: a line through 2 "
            "points fits exactly and has no confidence interval or p-value"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"scaling_fit(): alpha must be in (0, 1), got {alpha}")
    meta = models_frame(
        models,
        ["params_total", "params_active", "family", "vocab_size", "random_weights"],
        function="scaling_fit",
    )
    meta = meta[["params_total", "params_active", "family", "vocab_size", "random_weights"]]
    profiles = layer_profiles(sensitivity, function="scaling_fit")
    require_known_models(profiles["model"].unique(), meta.index, function="scaling_fit")
    per_model = nan_propagating_mean(profiles, ["kind", "component", "strength", "model"], "mean_delta_nll")

    per_model = per_model.join(meta, on="model")
    # plain arrays: the per-cell work is tiny and pandas indexing would dominate long sweeps
    columns = {c: per_model[c].to_numpy() for c in ["model", "family", "vocab_size", "random_weights"]}
    y_all = per_model["mean_delta_nll"].to_numpy(dtype=float)

    rows = []
    for (kind, component, strength), at in per_model.groupby(
        ["kind", "component", "strength"], sort=True
    ).indices.items():
        models_in_cell, y = columns["model"][at].astype(str), y_all[at]
        usable = np.isfinite(y) & (y > 0)
        described = at[usable] if usable.any() else at
        warnings = _dropped_warnings(models_in_cell, y) + _comparability_warnings(
            columns["family"][described],
            columns["vocab_size"][described],
            columns["random_weights"][described],
        )
        for basis, column in PARAM_BASES.items():
            params = per_model[column].to_numpy(dtype=float)[at]
            fit = _fit(models_in_cell[usable], params[usable], y[usable], min_models, alpha, warnings)
            rows.append(
                {"kind": kind, "component": component, "strength": strength, "param_basis": basis, **fit}
            )
    return pd.DataFrame(rows, columns=SCALING_COLUMNS)


def _dropped_warnings(models: np.ndarray, y: np.ndarray) -> list[str]:
    warnings = []
    nonfinite = ~np.isfinite(y)
    if nonfinite.any():
        names = ", ".join(sorted(models[nonfinite]))
        warnings.append(
            f"{int(nonfinite.sum())} model(s) with non-finite ΔNLL (loss overflowed) dropped: {names}"
        )
    not_positive = np.isfinite(y) & (y <= 0)
    if not_positive.any():
        names = ", ".join(sorted(models[not_positive]))
        warnings.append(
            f"{int(not_positive.sum())} model(s) with mean ΔNLL <= 0 dropped (no logarithm): {names}"
        )
    return warnings


def _fit(
    models: np.ndarray,
    params: np.ndarray,
    y: np.ndarray,
    min_models: int,
    alpha: float,
    cell_warnings: list[str],
) -> dict:
    """OLS of ln(y) on ln(params) over the usable models (y finite and > 0)."""
    order = np.argsort(params, kind="stable")
    models, params, y = models[order], params[order], y[order]
    n = len(y)
    result = {
        "n_models": n,
        "models": ";".join(models),
        "exponent": np.nan,
        "exponent_ci_low": np.nan,
        "exponent_ci_high": np.nan,
        "intercept": np.nan,
        "r2": np.nan,
        "r2_required_p05": r2_required(n),
        "p_value": np.nan,
    }
    warnings = list(cell_warnings)
    if n < MIN_POINTS_FOR_FIT:
        warnings.insert(
            0, f"no fit: a log-log line needs at least {MIN_POINTS_FOR_FIT} models with ΔNLL > 0, have {n}"
        )
    elif np.ptp(params) == 0:
        warnings.insert(0, "all models have the same parameter count: no slope can be fitted")
    else:
        if n < min_models:
            warnings.insert(
                0, f"only {n} models (fewer than {min_models}): treat the exponent as a sketch, not a law"
            )
        design = np.column_stack([np.ones(n), np.log(params)])  # [n, 2]: intercept, ln(params)
        fit = OLS(np.log(y), design).fit()
        ci = fit.conf_int(alpha)  # [2, 2]: rows = coefficients, columns = low/high
        result.update(
            exponent=float(fit.params[1]),
            exponent_ci_low=float(ci[1, 0]),
            exponent_ci_high=float(ci[1, 1]),
            intercept=float(fit.params[0]),
            r2=float(fit.rsquared),
            p_value=float(fit.pvalues[1]),
        )
    result["warnings"] = "; ".join(warnings)
    return result


def _comparability_warnings(
    families: np.ndarray, vocab_sizes: np.ndarray, random_weights: np.ndarray
) -> list[str]:
    warnings = []
    distinct_families = sorted({str(f) for f in families})
    if len(distinct_families) > 1:
        warnings.append(
            f"models differ in family ({', '.join(distinct_families)}): the exponent mixes architecture with size"
        )
    distinct_vocab = sorted({int(v) for v in vocab_sizes})
    if len(distinct_vocab) > 1:
        warnings.append(
            f"models differ in tokenizer vocabulary ({', '.join(map(str, distinct_vocab))}): per-token ΔNLL is not "
            "on one scale across them"
        )
    n_random = int(random_weights.astype(bool).sum())
    if n_random and n_random == len(random_weights):
        warnings.append(
            "all models have random weights (tiny test models): plumbing only, not a scaling result"
        )
    elif n_random:
        warnings.append(
            f"{n_random} of {len(random_weights)} models have random weights: plumbing only, leave them out"
        )
    return warnings
