"""Does sensitivity scale with model size? A log-log OLS fit across the pretrained models of one family.

Only pretrained models of one family enter a fit: random-weight models are plumbing checks and never do
(they are named in `warnings`), and mixing families would confound size with architecture. For each
(family, kind, component, strength) a model's sensitivity is its mean ΔNLL over seeds and measured layers.
The fit is ln(mean ΔNLL) = intercept + exponent · ln(params), by ordinary least squares, once with total and
once with active parameters (they differ only for MoE models), so mean ΔNLL ≈ e^intercept · params^exponent.

With a handful of models a high R² is cheap: r2_required_p05 is the R² that a slope test at p < 0.05 needs at
this n (from t² = (n - 2) r² / (1 - r²): r² = t²/(t² + n - 2) with t the two-sided 5% critical value on n - 2
degrees of freedom). Every (family, cell) with a pretrained model gets a row: with fewer than min_models (>= 3)
usable pretrained models there is no fit (NaN columns) and `warnings` starts with "not enough models", so an
empty or meaningless result is never silent. A cell with no pretrained model at all gets one row with family
NULL saying so.
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
    "family",
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
    """One row per (family, kind, component, strength, param_basis): the log-log fit and plain-language warnings.

    `models` is the `models` relation (params_total, params_active, family, vocab_size, random_weights).
    Random-weight models never enter a fit. Models with mean ΔNLL <= 0 or non-finite cannot enter a log fit
    and are dropped (warned, with names). Below min_models usable pretrained models of the family there is no
    fit: NaN columns and the warning "not enough models". `alpha` sets the exponent CI level (1 - alpha);
    r2_required_p05 is always at p < 0.05.
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
    random_models = per_model["random_weights"].fillna(False).astype(bool).to_numpy()
    excluded = sorted(set(per_model.loc[random_models, "model"].astype(str)))
    excluded_note = (
        [f"random-weight models left out (plumbing only, never in a fit): {', '.join(excluded)}"]
        if excluded
        else []
    )
    pretrained = per_model.loc[~random_models]
    # plain arrays: the per-cell work is tiny and pandas indexing would dominate long sweeps
    columns = {c: pretrained[c].to_numpy() for c in ["model", "vocab_size"]}
    y_all = pretrained["mean_delta_nll"].to_numpy(dtype=float)
    cells = (
        per_model[["kind", "component", "strength"]]
        .drop_duplicates()
        .sort_values(["kind", "component", "strength"])
    )
    fitted_cells = pretrained.groupby(["family", "kind", "component", "strength"], sort=True).indices

    rows = []
    for (family, kind, component, strength), at in fitted_cells.items():
        models_in_cell, y = columns["model"][at].astype(str), y_all[at]
        usable = np.isfinite(y) & (y > 0)
        described = at[usable] if usable.any() else at
        warnings = _dropped_warnings(models_in_cell, y) + _vocabulary_warnings(
            columns["vocab_size"][described]
        )
        warnings += excluded_note
        for basis, column in PARAM_BASES.items():
            params = pretrained[column].to_numpy(dtype=float)[at]
            fit = _fit(models_in_cell[usable], params[usable], y[usable], min_models, alpha, warnings, family)
            rows.append({"family": family, "kind": kind, "component": component, "strength": strength,
                         "param_basis": basis, **fit})  # fmt: skip
    covered = {(k, c, s) for (_, k, c, s) in fitted_cells}
    for kind, component, strength in cells.itertuples(index=False):
        if (kind, component, strength) in covered:
            continue
        for basis in PARAM_BASES:
            fit = _fit(
                np.array([], dtype=str), np.array([]), np.array([]), min_models, alpha, excluded_note, None
            )
            rows.append({"family": None, "kind": kind, "component": component, "strength": strength,
                         "param_basis": basis, **fit})  # fmt: skip
    out = pd.DataFrame(rows, columns=SCALING_COLUMNS)
    return out.sort_values(["kind", "component", "strength", "family", "param_basis"], ignore_index=True)


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
    family: str | None,
) -> dict:
    """OLS of ln(y) on ln(params) over the usable pretrained models of one family (y finite and > 0)."""
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
    if n < min_models:
        of_family = f"of family {family} " if family is not None else ""
        warnings.insert(
            0,
            f"not enough models: {n} pretrained model(s) {of_family}with ΔNLL > 0; a scaling fit needs at least "
            f"{min_models} pretrained models of one family",
        )
    elif np.ptp(params) == 0:
        warnings.insert(0, "all models have the same parameter count: no slope can be fitted")
    else:
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


def _vocabulary_warnings(vocab_sizes: np.ndarray) -> list[str]:
    distinct_vocab = sorted({int(v) for v in vocab_sizes})
    if len(distinct_vocab) > 1:
        return [
            f"models differ in tokenizer vocabulary ({', '.join(map(str, distinct_vocab))}): per-token ΔNLL is not "
            "on one scale across them"
        ]
    return []
