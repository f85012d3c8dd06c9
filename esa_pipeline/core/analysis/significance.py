"""Which sensitivity cells differ from the baseline beyond evaluation noise, and beyond draw-to-draw noise.

A cell is one perturbation setting: (model, kind, component, layer, expert, strength). Its replicates are the
evaluation windows, the same token spans for the baseline and for every seed, grouped into clusters: the
documents they were cut from (`doc_id` in `sensitivity_windows`), or each window on its own when no document
id is stored (`cluster_unit` says which). Windows of one document are not independent, so every standard
error here is clustered by document. The estimate is the token-weighted mean per-token ΔNLL
(Σ ΔNLL_sum / Σ tokens, the `sensitivity` relation's delta_nll averaged over seeds).

Two tests per cell (estimators and sources in `draws.py`):
- conditional_* (conditional on the noise draws actually taken): the seeds are averaged per document, then a
  cluster-robust t-test over documents (df = documents - 1). It answers "did these particular draws change
  the loss?"; with equal windows and one window per document it is scipy's one-sample t-test (tested).
- the headline columns (ci_low, ci_high, t_stat, dof, p_value, p_holm, p_bh, significant_*): for a stochastic
  kind with >= 2 seeds, the across-draw test, a two-way seed × document random-effects analysis in which
  the seed is a random factor: "does this perturbation, drawn afresh, change the loss?". For a deterministic
  setting (seed NULL, a true `deterministic` column, a seed-independent kind — norm `scale` and the
  compression kinds — or a top/bottom selection, except noise on top/bottom neurons, whose noise is still
  seeded; `seed_independent_rows`, from perturb.seed_independent) there is no draw to vary, so the
  clustered test is the whole uncertainty and is the headline (`test_used` = "clustered_deterministic").
  A stochastic cell with one seed has no headline test: draw-to-draw variance cannot be estimated from one
  draw (NULL, with the reason in `note`; its conditional_* columns are still filled).

Holm (family-wise error) and Benjamini–Hochberg (false discovery rate) adjust p-values across the whole sweep
of one model (every kind, component, layer, expert and strength), separately for the headline and the
conditional p-values.

Untested is not "not significant" (`adjust_p_values`): a cell whose test could not run keeps its row with
NULL p-values and NULL (not False) significant_* flags, and `note` gives the reason:
  - any window's ΔNLL is non-finite: the perturbed model's loss overflowed, the most damaging outcome there
    is; mean_delta_nll is inf/NaN as measured, and critical_layers ranks it first;
  - fewer than 2 documents (clusters);
  - seeds that did not score the same windows (the two-way design needs every seed on every window) and share
    fewer than 2 clusters of windows that every seed scored. Adaptive budgets stop each seed's point after its
    own number of windows, but every seed visits the budget's windows in the same seeded order, so the windows
    every seed scored are a common prefix of that order: the across-draw test runs on them (note
    NOTE_COMMON_WINDOWS, with their count) while mean_delta_nll and conditional_* use every scored window;
  - the cell is in `sensitivity` but has no per-window rows (mean_delta_nll then from its seed rows).
A cell whose ΔNLL is exactly zero in every window (the perturbation changed nothing measurable) is tested as
t = 0, p = 1 and says so in `note`; the correction includes it. Seeds also give a spread (seed_sd/min/max of
the seed-level means) and sigma_draw, the estimated between-draw SD of the per-token ΔNLL.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from esa_pipeline.core.analysis._common import as_nullable_int, check_unique, require_columns
from esa_pipeline.core.analysis.draws import across_draws_test, clustered_ratio_test
from esa_pipeline.core.perturbation.perturb import seed_independent_rows

BASE_KEYS = ["model", "kind", "component", "layer", "expert", "strength"]
# settings that make two rows different experiments when present (neuron mode, weight selection, quantization
# group): part of the cell's identity, NULL when the relation does not carry them
SETTING_KEYS = ["mode", "selection", "group_size"]
CELL_KEYS = [*BASE_KEYS, *SETTING_KEYS]
WINDOW_COLUMNS = [*BASE_KEYS, "seed", "window_id", "n_tokens", "delta_nll_sum"]

SIGNIFICANCE_COLUMNS = [
    "model",
    "kind",
    "component",
    "layer",
    "expert",
    "strength",
    "mode",
    "selection",
    "group_size",
    "n_seeds",
    "n_windows",
    "n_clusters",
    "cluster_unit",
    "mean_delta_nll",
    "test_used",
    "ci_low",
    "ci_high",
    "t_stat",
    "dof",
    "p_value",
    "p_holm",
    "p_bh",
    "significant_holm",
    "significant_bh",
    "sigma_draw",
    "conditional_ci_low",
    "conditional_ci_high",
    "conditional_t_stat",
    "conditional_p_value",
    "conditional_p_holm",
    "conditional_p_bh",
    "conditional_significant_holm",
    "conditional_significant_bh",
    "effect_size",
    "seed_sd",
    "seed_min",
    "seed_max",
    "note",
]
TEST_ACROSS_DRAWS = "across_draws"
TEST_DETERMINISTIC = "clustered_deterministic"

NOTE_NONFINITE = (
    "non-finite ΔNLL in {k} of {n} windows (the perturbed model's loss overflowed: the most sensitive outcome): "
    "not tested"
)
NOTE_FEW_CLUSTERS = "fewer than 2 {unit}s: not tested"
NOTE_NO_WINDOWS = "no per-window rows stored for this cell: not tested"
NOTE_ALL_ZERO = "ΔNLL exactly zero in every window: the perturbation changed nothing measurable"
NOTE_ZERO_VARIANCE = "identical seed-averaged ΔNLL per token in every {unit}: zero variance, the conditional t is infinite"
NOTE_ONE_SEED = (
    "one seed of a stochastic kind: draw-to-draw variance cannot be estimated, no across-draw test "
    "(conditional_* columns test these draws only)"
)
NOTE_UNBALANCED = (
    "seeds did not score the same windows and share fewer than 2 {unit}s of common windows: no across-draw test "
    "(conditional_* still valid)"
)
NOTE_COMMON_WINDOWS = (
    "seeds scored different windows (adaptive budgets): across-draw test on the {k} windows every seed scored "
    "({c} {unit}s); mean_delta_nll and conditional_* use all {n}"
)
NOTE_DETERMINISTIC = (
    "deterministic kind, measured once: no draw-to-draw variance, the clustered test is the headline"
)


def significance(
    sensitivity_windows: pd.DataFrame,
    sensitivity: pd.DataFrame | None = None,
    *,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per cell (SIGNIFICANCE_COLUMNS): across-draw and conditional tests, Holm and BH, seed spread.

    `sensitivity` is optional: when given, seed spread comes from its per-seed delta_nll (the numbers users
    see there) and cells that have no window rows still get a row (NULL tests, with a note). `alpha` sets
    the CI level (1 - alpha) and the significant_* thresholds; adjusted p-values do not depend on it.
    Raises ValueError on missing columns, several datasets, duplicate keys or windows without tokens.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"significance(): alpha must be in (0, 1), got {alpha}")
    windows, unit = _prepare_windows(sensitivity_windows)
    seed_rows = None if sensitivity is None else _prepare_sensitivity(sensitivity)
    if seed_rows is not None:  # a setting the windows do not carry cannot tell their cells apart
        for column in SETTING_KEYS:
            if column not in sensitivity_windows.columns:
                seed_rows[column] = pd.NA if column == "group_size" else None

    # One integer id per cell over both frames: NULL layer/expert/seed keys make index joins fragile.
    parts = [windows.assign(_source="windows")]
    if seed_rows is not None:
        parts.append(seed_rows.assign(_source="sensitivity"))
    combined = pd.concat(parts, ignore_index=True)
    combined["_cell"] = combined.groupby(CELL_KEYS, dropna=False, sort=True).ngroup()
    cells = combined.drop_duplicates("_cell").set_index("_cell")[CELL_KEYS].sort_index()
    windows = combined.loc[combined["_source"] == "windows"]
    stored = combined.loc[combined["_source"] == "sensitivity"] if seed_rows is not None else None

    out = cells.join(_tests(windows, unit, alpha)).join(_seed_spread(windows, stored))
    without_windows = out["n_windows"].isna()
    out.loc[without_windows, "mean_delta_nll"] = out.loc[without_windows, "mean_over_seeds"]
    for column in ("n_windows", "n_clusters", "n_seeds"):
        out[column] = out[column].fillna(0).astype(int)
    out["note"] = out["note"].fillna(NOTE_NO_WINDOWS)
    out["cluster_unit"] = unit
    out = _adjust_per_model(out, alpha)
    return out[SIGNIFICANCE_COLUMNS].reset_index(drop=True)


def adjust_p_values(p_values: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """Holm and BH adjusted p-values over the tested (non-NaN) entries, and nullable significance flags.

    p_values: [n] raw p-values, NaN = could not be tested. Returns n rows: p_holm, p_bh (NaN where untested)
    and significant_holm, significant_bh as pandas "boolean" (NA where untested: an untested cell is not a
    non-significant one, and leaving it out of the family is what Holm/BH assume).
    Example: [0.01, 0.04, NaN, 0.2] → p_bh [0.03, 0.06, NaN, 0.2], significant_bh [True, False, NA, False].
    """
    p = np.asarray(p_values, dtype=float)
    tested = ~np.isnan(p)
    p_holm, p_bh = np.full(len(p), np.nan), np.full(len(p), np.nan)
    if tested.any():
        p_holm[tested] = holm_adjusted(p[tested])
        p_bh[tested] = multipletests(p[tested], alpha=alpha, method="fdr_bh")[1]
    return pd.DataFrame(
        {
            "p_holm": p_holm,
            "p_bh": p_bh,
            "significant_holm": pd.array(np.where(tested, p_holm <= alpha, None), dtype="boolean"),
            "significant_bh": pd.array(np.where(tested, p_bh <= alpha, None), dtype="boolean"),
        }
    )


def _tests(windows: pd.DataFrame, unit: str, alpha: float) -> pd.DataFrame:
    """Per cell: mean, conditional (clustered) test, across-draw test where it applies, headline, note."""
    flagged = windows.assign(_nan=windows["delta_nll_sum"].isna())
    # per window, seeds pooled: a window is non-finite if any seed's is
    per_window = flagged.groupby(["_cell", "window_id"]).agg(
        d=("delta_nll_sum", "sum"), any_nan=("_nan", "any")
    )
    nonfinite_window = per_window["any_nan"] | ~np.isfinite(per_window["d"])
    n_windows = per_window.groupby(level="_cell").size()
    n_nonfinite = nonfinite_window.groupby(level="_cell").sum()

    per_seed_cluster, grouped, conditional = _seed_cluster_sums(flagged, alpha)
    n_clusters = conditional["n_clusters"]

    cell_of = per_seed_cluster["_cell"]
    n_seeds = per_seed_cluster.groupby("_cell")["seed"].nunique(dropna=False)
    deterministic = windows.groupby("_cell")["_deterministic"].all().reindex(n_seeds.index)
    balanced = (per_seed_cluster.groupby("_cell").size() == n_seeds * n_clusters) & _same_tokens(grouped)
    finite = n_nonfinite == 0
    testable = finite & (n_clusters >= 2)
    eligible = testable & ~deterministic & (n_seeds >= 2) & balanced
    across = across_draws_test(
        per_seed_cluster.loc[cell_of.map(eligible)], conditional["mean"].loc[eligible[eligible].index], alpha
    )
    # Unbalanced multi-seed cells (adaptive budgets): the across-draw test on the windows every seed scored.
    unbalanced = testable & ~deterministic & (n_seeds >= 2) & ~balanced
    common_across, common_windows, common_clusters = _common_window_test(flagged, unbalanced, n_seeds, alpha)
    if len(common_across):
        across = pd.concat([across, common_across])
    eligible = eligible | (common_windows > 0)

    out = pd.DataFrame(
        {"n_windows": n_windows, "n_clusters": n_clusters, "mean_delta_nll": conditional["mean"]}
    )
    for column in ("ci_low", "ci_high", "t_stat", "p_value"):
        out[f"conditional_{column}"] = conditional[column].where(testable)
    out["effect_size"] = out["conditional_t_stat"] / np.sqrt(n_clusters)  # Cohen's d_z over clusters
    headline_deterministic = testable & deterministic
    out["test_used"] = pd.Series(None, index=out.index, dtype=object)
    out.loc[eligible, "test_used"] = TEST_ACROSS_DRAWS
    out.loc[headline_deterministic, "test_used"] = TEST_DETERMINISTIC
    for column, source in (("ci_low", "ci_low"), ("ci_high", "ci_high"), ("t_stat", "t_stat"),
                           ("dof", "df"), ("p_value", "p_value")):  # fmt: skip
        value = across[source].reindex(out.index)
        out[column] = value.where(eligible, conditional[source].where(headline_deterministic))
    out["sigma_draw"] = across["sigma_draw"].reindex(out.index)
    out["note"] = _notes(out, n_nonfinite, conditional, testable, deterministic, n_seeds, balanced, unit,
                         common_windows, common_clusters)  # fmt: skip
    return out


def _common_window_test(
    flagged: pd.DataFrame, unbalanced: pd.Series, n_seeds: pd.Series, alpha: float
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """The across-draw test of each `unbalanced` cell on the windows all its seeds scored, where they span >= 2
    clusters with equal tokens per seed: (its results indexed by _cell, common windows per cell — 0 where not
    tested —, common clusters per cell)."""
    none = pd.Series(0, index=n_seeds.index)
    sub = flagged.loc[flagged["_cell"].map(unbalanced).fillna(False).astype(bool)]
    common = sub.loc[sub.groupby(["_cell", "window_id"])["seed"].transform("nunique") == sub["_cell"].map(n_seeds)]
    if common.empty:
        return pd.DataFrame(), none, none
    per_seed_cluster, grouped, conditional = _seed_cluster_sums(common, alpha)
    n_windows = common.groupby("_cell")["window_id"].nunique().reindex(n_seeds.index, fill_value=0)
    n_clusters = conditional["n_clusters"].reindex(n_seeds.index, fill_value=0)
    ok = (n_clusters >= 2) & _same_tokens(grouped).reindex(n_seeds.index, fill_value=False) & unbalanced
    cells = ok[ok].index
    tested = across_draws_test(per_seed_cluster.loc[per_seed_cluster["_cell"].isin(cells)],
                               conditional["mean"].loc[cells], alpha) if len(cells) else pd.DataFrame()  # fmt: skip
    return tested, n_windows.where(ok, 0), n_clusters


def _same_tokens(grouped: object) -> pd.Series:
    """Per cell: every seed scored the same tokens in every cluster (grouped: per (cell, cluster))."""
    return (grouped["t"].max() - grouped["t"].min()).groupby(level="_cell").max() == 0  # type: ignore[index]


def _seed_cluster_sums(flagged: pd.DataFrame, alpha: float) -> tuple[pd.DataFrame, object, pd.DataFrame]:
    """Per (cell, seed, cluster) ΔNLL and token sums (NaN kept), their per-(cell, cluster) grouping, and the
    conditional (seeds averaged, clustered) test per cell."""
    per_seed_cluster = flagged.groupby(["_cell", "seed", "cluster"], dropna=False).agg(
        d=("delta_nll_sum", "sum"), t=("n_tokens", "sum"), any_nan=("_nan", "any")
    )
    per_seed_cluster.loc[per_seed_cluster["any_nan"], "d"] = np.nan  # sum skips NaN: put it back
    per_seed_cluster = per_seed_cluster.reset_index()
    grouped = per_seed_cluster.groupby(["_cell", "cluster"])
    per_cluster = grouped.agg(d=("d", "mean"), t=("t", "mean"), any_nan=("any_nan", "any")).reset_index()
    per_cluster.loc[per_cluster["any_nan"], "d"] = np.nan
    return per_seed_cluster, grouped, clustered_ratio_test(per_cluster, alpha)


def _notes(out, n_nonfinite, conditional, testable, deterministic, n_seeds, balanced, unit, common_windows,
           common_clusters) -> pd.Series:  # fmt: skip
    """Per cell: why it was not tested, or what its test means ("; "-joined; "" for a plain across-draw test)."""
    index = out.index
    as_array = {  # plain arrays: a per-cell loop over pandas lookups dominates long sweeps
        "nonfinite": n_nonfinite.reindex(index).to_numpy(),
        "windows": out["n_windows"].to_numpy(),
        "clusters": out["n_clusters"].to_numpy(),
        "all_zero": ((conditional["mean"] == 0) & (conditional["se"] == 0)).reindex(index).to_numpy(),
        "zero_se": (conditional["se"] == 0).reindex(index).to_numpy(),
        "testable": testable.reindex(index).to_numpy(),
        "deterministic": deterministic.reindex(index).to_numpy(),
        "seeds": n_seeds.reindex(index).to_numpy(),
        "balanced": balanced.reindex(index).to_numpy(),
        "common_windows": common_windows.reindex(index).fillna(0).to_numpy(),
        "common_clusters": common_clusters.reindex(index).fillna(0).to_numpy(),
    }
    notes = []
    for i in range(len(index)):
        c = {k: v[i] for k, v in as_array.items()}
        reasons = []
        if c["nonfinite"] > 0:
            reasons.append(NOTE_NONFINITE.format(k=int(c["nonfinite"]), n=int(c["windows"])))
        elif c["clusters"] < 2:
            reasons.append(NOTE_FEW_CLUSTERS.format(unit=unit))
        elif c["all_zero"]:
            reasons.append(NOTE_ALL_ZERO)
        elif c["zero_se"]:
            reasons.append(NOTE_ZERO_VARIANCE.format(unit=unit))
        if c["testable"]:
            if c["deterministic"]:
                reasons.append(NOTE_DETERMINISTIC)
            elif c["seeds"] < 2:
                reasons.append(NOTE_ONE_SEED)
            elif not c["balanced"] and c["common_windows"] > 0:
                reasons.append(NOTE_COMMON_WINDOWS.format(k=int(c["common_windows"]), c=int(c["common_clusters"]),
                                                          unit=unit, n=int(c["windows"])))  # fmt: skip
            elif not c["balanced"]:
                reasons.append(NOTE_UNBALANCED.format(unit=unit))
        notes.append("; ".join(reasons))
    return pd.Series(notes, index=index, dtype=object)


def _seed_spread(windows: pd.DataFrame, stored: pd.DataFrame | None) -> pd.DataFrame:
    """n_seeds and sd/min/max over seeds of each seed's mean ΔNLL (NaN if any seed's is NaN).

    Seed means come from the `sensitivity` rows where given (what users see there), else from the windows
    (Σ ΔNLL_sum / Σ tokens per seed, the same number). n_seeds counts the draws that have windows (a
    deterministic cell, seed NULL, counts as one).
    """
    flagged = windows.assign(_nan=windows["delta_nll_sum"].isna())
    per_seed = flagged.groupby(["_cell", "seed"], dropna=False).agg(
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
    seeds_with_windows = windows.groupby("_cell")["seed"].nunique(dropna=False)
    spread["n_seeds"] = seeds_with_windows.reindex(spread.index).fillna(grouped.size())
    return spread


def _prepare_windows(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Checked window rows with `cluster` (doc_id, else window_id) and `_deterministic`; and the cluster unit."""
    require_columns(df, WINDOW_COLUMNS, function="significance", relation="sensitivity_windows")
    optional = [c for c in ("dataset", "doc_id", "deterministic", *SETTING_KEYS) if c in df.columns]
    out = _with_settings(df[WINDOW_COLUMNS + optional].copy())
    out["layer"] = as_nullable_int(out["layer"])
    out["expert"] = as_nullable_int(out["expert"])
    out["seed"] = as_nullable_int(out["seed"])
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
    has_docs = "doc_id" in out.columns and out["doc_id"].notna().all() and len(out) > 0
    if "doc_id" in out.columns and not has_docs and out["doc_id"].notna().any():
        raise ValueError(
            "significance(): some sensitivity_windows rows have doc_id and others not; store doc_id on every "
            "window (or on none) so that clusters are well defined"
        )
    out["cluster"] = out["doc_id"].astype(str) if has_docs else out["window_id"].astype(str)
    deterministic = out["seed"].isna() | seed_independent_rows(out)
    if "deterministic" in out.columns:
        deterministic |= out["deterministic"].fillna(False).astype(bool)
    out["_deterministic"] = deterministic.to_numpy(dtype=bool)
    return out, "document" if has_docs else "window"


def _prepare_sensitivity(df: pd.DataFrame) -> pd.DataFrame:
    require_columns(df, [*BASE_KEYS, "seed", "delta_nll"], function="significance", relation="sensitivity")
    out = _with_settings(df[[*BASE_KEYS, "seed", "delta_nll", *[c for c in SETTING_KEYS if c in df.columns]]].copy())
    out["layer"] = as_nullable_int(out["layer"])
    out["expert"] = as_nullable_int(out["expert"])
    out["seed"] = as_nullable_int(out["seed"])
    out["delta_nll"] = out["delta_nll"].astype(float)
    check_unique(
        out,
        [*CELL_KEYS, "seed"],
        function="significance",
        relation="sensitivity",
    )
    return out


def _with_settings(frame: pd.DataFrame) -> pd.DataFrame:
    """SETTING_KEYS present on every frame (NULL where the relation does not carry them)."""
    for column in SETTING_KEYS:
        if column not in frame.columns:
            frame[column] = None
    frame["mode"] = frame["mode"].astype(object)
    frame["selection"] = frame["selection"].astype(object)
    frame["group_size"] = pd.to_numeric(frame["group_size"], errors="raise").astype("Int64")
    return frame


def _adjust_per_model(out: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm/BH per model, for the headline p_value and, separately, for conditional_p_value."""
    columns = {}
    for prefix in ("", "conditional_"):
        adjusted = []
        for positions in out.groupby("model").indices.values():
            part = adjust_p_values(out[f"{prefix}p_value"].to_numpy()[positions], alpha)
            adjusted.append(part.set_index(out.index[positions]))
        frame = pd.concat(adjusted) if adjusted else adjust_p_values(np.empty(0), alpha)
        for column in frame.columns:
            columns[f"{prefix}{column}"] = frame[column].reindex(out.index)
    return out.assign(**columns)


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
