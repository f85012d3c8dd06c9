"""Which sensitivity cells differ from the baseline beyond evaluation noise.

A cell is one perturbation setting: (model, kind, component, layer, expert, strength). Its replicates are the
evaluation windows, which are the same token spans for the baseline and for every seed, so each window gives
a paired difference. Per window the seeds are averaged first (seeds are a handful of draws of the same
perturbation, not independent samples of text), then a one-sample t-test over windows asks whether the mean
per-token ΔNLL is zero.

The mean is token-weighted (Σ ΔNLL_sum / Σ tokens, the same number as the `sensitivity` relation's delta_nll
averaged over seeds), and its standard error is the linearised ratio-estimator SE over windows:
    se = sqrt(n / (n - 1) · Σ_w (D_w - mean · T_w)²) / Σ_w T_w
with D_w, T_w the window's seed-averaged ΔNLL sum and token count. When all windows have equal token counts
this is exactly scipy.stats.ttest_1samp on the per-window per-token differences (tested). Effect size is
Cohen's d_z = t / sqrt(n). Seeds give a spread (sd/min/max of seed-level means), never a p-value: with three
seeds no test can reach p < 0.05.

Holm (family-wise error) and Benjamini–Hochberg (false discovery rate) adjust p-values across the whole sweep
of one model: every kind, component, layer, expert and strength measured for it.

Cells that cannot be tested keep a row, with NaN p-value, excluded from the corrections, and a `note`:
  - any window's ΔNLL is non-finite (the perturbed model overflowed to inf/NaN losses): mean_delta_nll is
    inf/NaN as measured;
  - fewer than 2 windows;
  - the cell is in `sensitivity` but has no per-window rows (mean_delta_nll then from its seed rows).
A cell whose ΔNLL is exactly zero in every window (e.g. σ = 0.001 in bf16 changes no stored weight) is
tested as t = 0, p = 1 and says so in `note`; the correction includes it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from esa_pipeline.core.analysis._common import as_nullable_int, check_unique, require_columns

CELL_KEYS = ["model", "kind", "component", "layer", "expert", "strength"]
WINDOW_COLUMNS = [*CELL_KEYS, "seed", "window_id", "n_tokens", "delta_nll_sum"]

# Contract columns of `significance`, plus `expert` (after layer; NULL = all experts / dense) and `note`.
SIGNIFICANCE_COLUMNS = [
    "model",
    "kind",
    "component",
    "layer",
    "expert",
    "strength",
    "n_seeds",
    "n_windows",
    "mean_delta_nll",
    "ci_low",
    "ci_high",
    "effect_size",
    "t_stat",
    "p_value",
    "p_holm",
    "p_bh",
    "significant_holm",
    "significant_bh",
    "seed_sd",
    "seed_min",
    "seed_max",
    "note",
]

NOTE_NONFINITE = "non-finite ΔNLL in {k} of {n} windows (the perturbed model's loss overflowed): not tested"
NOTE_FEW_WINDOWS = "fewer than 2 windows: not tested"
NOTE_NO_WINDOWS = "no per-window rows stored for this cell: not tested"
NOTE_ALL_ZERO = "ΔNLL exactly zero in every window: the perturbation changed nothing measurable"
NOTE_ZERO_VARIANCE = "identical ΔNLL per token in every window: zero variance, t is infinite"


def significance(
    sensitivity_windows: pd.DataFrame,
    sensitivity: pd.DataFrame | None = None,
    *,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per cell with the paired window test, Holm and BH across each model's sweep, and seed spread.

    `sensitivity` is optional: when given, seed spread comes from its per-seed delta_nll (the numbers users
    see there) and cells that have no window rows still get a row (NaN p-value, with a note). `alpha` sets
    the CI level (1 - alpha) and the significant_* thresholds; p_holm/p_bh do not depend on it.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"significance(): alpha must be in (0, 1), got {alpha}")
    windows = _prepare_windows(sensitivity_windows)
    seed_rows = None if sensitivity is None else _prepare_sensitivity(sensitivity)

    # One integer id per cell over both frames: NULL layer/expert keys make index joins fragile.
    parts = [windows.assign(_source="windows")]
    if seed_rows is not None:
        parts.append(seed_rows.assign(_source="sensitivity"))
    combined = pd.concat(parts, ignore_index=True)
    combined["_cell"] = combined.groupby(CELL_KEYS, dropna=False, sort=True).ngroup()
    cells = combined.drop_duplicates("_cell").set_index("_cell")[CELL_KEYS].sort_index()
    windows = combined.loc[combined["_source"] == "windows"]

    stored = combined.loc[combined["_source"] == "sensitivity"] if seed_rows is not None else None
    out = cells.join(_window_tests(windows, alpha)).join(_seed_spread(windows, stored))
    without_windows = out["n_windows"].isna()
    out.loc[without_windows, "mean_delta_nll"] = out.loc[without_windows, "mean_over_seeds"]
    out["n_windows"] = out["n_windows"].fillna(0).astype(int)
    out["n_seeds"] = out["n_seeds"].fillna(0).astype(int)
    out["note"] = out["note"].fillna(NOTE_NO_WINDOWS)
    out = _adjust_per_model(out, alpha)
    return out[SIGNIFICANCE_COLUMNS].reset_index(drop=True)


def _seed_spread(windows: pd.DataFrame, stored: pd.DataFrame | None) -> pd.DataFrame:
    """n_seeds and sd/min/max over seeds of each seed's mean ΔNLL (NaN if any seed's is NaN).

    Seed means come from the `sensitivity` rows where given (what users see there), else from the windows
    (Σ ΔNLL_sum / Σ tokens per seed, the same number). n_seeds counts the seeds that have windows.
    """
    flagged = windows.assign(_nan=windows["delta_nll_sum"].isna())
    per_seed = flagged.groupby(["_cell", "seed"]).agg(
        d=("delta_nll_sum", "sum"), t=("n_tokens", "sum"), any_nan=("_nan", "any")
    )
    seed_means = (per_seed["d"] / per_seed["t"]).where(~per_seed["any_nan"]).rename("seed_mean").reset_index()
    if stored is not None:
        from_stored = stored[["_cell", "seed", "delta_nll"]].rename(columns={"delta_nll": "seed_mean"})
        seed_means = pd.concat(
            [from_stored, seed_means.loc[~seed_means["_cell"].isin(from_stored["_cell"])]], ignore_index=True
        )
    grouped = seed_means.groupby("_cell")["seed_mean"]
    spread = pd.DataFrame(
        {
            "seed_sd": grouped.std(),
            "seed_min": grouped.min(),
            "seed_max": grouped.max(),
            "mean_over_seeds": grouped.mean(),
        }
    )
    broken_seed = seed_means["seed_mean"].isna().groupby(seed_means["_cell"]).any()
    spread.loc[broken_seed, ["seed_sd", "seed_min", "seed_max", "mean_over_seeds"]] = np.nan
    seeds_with_windows = windows.groupby("_cell")["seed"].nunique()
    spread["n_seeds"] = seeds_with_windows.reindex(spread.index).fillna(grouped.size())
    return spread


def _prepare_windows(df: pd.DataFrame) -> pd.DataFrame:
    require_columns(df, WINDOW_COLUMNS, function="significance", relation="sensitivity_windows")
    keep = WINDOW_COLUMNS + (["dataset"] if "dataset" in df.columns else [])
    out = df[keep].copy()
    out["layer"] = as_nullable_int(out["layer"])
    out["expert"] = as_nullable_int(out["expert"])
    out["n_tokens"] = out["n_tokens"].astype(float)
    out["delta_nll_sum"] = out["delta_nll_sum"].astype(float)
    if "dataset" in out.columns:
        per_model = out.groupby("model")["dataset"].nunique()
        if (per_model > 1).any():
            raise ValueError(
                "significance(): windows from several datasets for "
                f"{sorted(per_model[per_model > 1].index)}; window ids are only paired within one dataset: "
                "filter sensitivity_windows to one dataset and call significance() once per dataset"
            )
    check_unique(
        out, [*CELL_KEYS, "seed", "window_id"], function="significance", relation="sensitivity_windows"
    )
    empty = out["n_tokens"] <= 0
    if empty.any():
        raise ValueError(
            f"significance(): {int(empty.sum())} window rows have n_tokens <= 0; every stored window must score "
            "at least one token (drop those rows or fix the windowing)"
        )
    return out


def _prepare_sensitivity(df: pd.DataFrame) -> pd.DataFrame:
    require_columns(df, [*CELL_KEYS, "seed", "delta_nll"], function="significance", relation="sensitivity")
    out = df[[*CELL_KEYS, "seed", "delta_nll"]].copy()
    out["layer"] = as_nullable_int(out["layer"])
    out["expert"] = as_nullable_int(out["expert"])
    out["delta_nll"] = out["delta_nll"].astype(float)
    check_unique(
        df.assign(layer=out["layer"], expert=out["expert"]),
        [*CELL_KEYS, "seed"],
        function="significance",
        relation="sensitivity",
    )
    return out


def _window_tests(windows: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per cell: token-weighted mean ΔNLL, ratio-estimator t-test over seed-averaged windows, note."""
    per_window = (
        windows.assign(_nan=windows["delta_nll_sum"].isna())
        .groupby(["_cell", "window_id"])
        .agg(d=("delta_nll_sum", "mean"), t=("n_tokens", "mean"), any_nan=("_nan", "any"))
    )
    # groupby mean skips NaN, so a NaN in any seed must be put back explicitly
    per_window.loc[per_window["any_nan"], "d"] = np.nan
    per_window = per_window.reset_index()
    cell_of = per_window["_cell"]

    n = per_window.groupby("_cell").size()
    sum_t = per_window["t"].groupby(cell_of).sum()
    sum_d = per_window["d"].groupby(cell_of).sum()
    sum_d[per_window["d"].isna().groupby(cell_of).any()] = np.nan
    n_nonfinite = (~np.isfinite(per_window["d"])).groupby(cell_of).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sum_d / sum_t
        resid = per_window["d"] - cell_of.map(mean) * per_window["t"]
        ss = (resid**2).groupby(cell_of).sum()
        se = np.sqrt(n / (n - 1) * ss) / sum_t
        all_zero = per_window["d"].eq(0).groupby(cell_of).all()
        t_stat = np.where(all_zero, 0.0, mean / se)

    out = pd.DataFrame({"n_windows": n, "mean_delta_nll": mean, "t_stat": t_stat}, index=n.index)
    testable = (n_nonfinite == 0) & (n >= 2)
    df = (n - 1).where(n >= 2)
    out.loc[~testable, "t_stat"] = np.nan
    out["p_value"] = np.where(testable, 2 * stats.t.sf(np.abs(out["t_stat"]), df.fillna(1)), np.nan)
    half_width = stats.t.ppf(1 - alpha / 2, df.fillna(1)) * se
    out["ci_low"] = np.where(testable, mean - half_width, np.nan)
    out["ci_high"] = np.where(testable, mean + half_width, np.nan)
    out["effect_size"] = out["t_stat"] / np.sqrt(n)  # Cohen's d_z of the paired differences

    note = pd.Series("", index=n.index, dtype=object)
    zero_variance = testable & (se == 0)
    note[zero_variance & all_zero] = NOTE_ALL_ZERO
    note[zero_variance & ~all_zero] = NOTE_ZERO_VARIANCE
    note[n < 2] = NOTE_FEW_WINDOWS
    nonfinite = n_nonfinite > 0
    note[nonfinite] = [
        NOTE_NONFINITE.format(k=k, n=m) for k, m in zip(n_nonfinite[nonfinite], n[nonfinite], strict=True)
    ]
    out["note"] = note
    return out


def _adjust_per_model(out: pd.DataFrame, alpha: float) -> pd.DataFrame:
    p_holm = np.full(len(out), np.nan)
    p_bh = np.full(len(out), np.nan)
    p_value = out["p_value"].to_numpy()
    for positions in out.groupby("model").indices.values():
        tested = positions[~np.isnan(p_value[positions])]
        if len(tested) == 0:
            continue
        p_holm[tested] = holm_adjusted(p_value[tested])
        p_bh[tested] = multipletests(p_value[tested], alpha=alpha, method="fdr_bh")[1]
    return out.assign(
        p_holm=p_holm, p_bh=p_bh, significant_holm=p_holm <= alpha, significant_bh=p_bh <= alpha
    )


def holm_adjusted(p_values: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values, equal to multipletests(method="holm")[1] (tested).

    Computed here because statsmodels' Holm branch calls gc.collect() on every call: 0.3 s per model in a
    process holding pandas frames, minutes for a long sweep list.
    """
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    stepped = np.maximum.accumulate(p_values[order] * np.arange(m, 0, -1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted
