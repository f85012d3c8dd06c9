"""The two variance estimators behind `significance`: clustered over documents, and across draws.

Both estimate the uncertainty of a ratio mean, the token-weighted mean per-token ΔNLL
    m = Σ D / Σ T
(D = a cluster's ΔNLL summed over its tokens, T = its token count), vectorised over many cells at once.
They are linearised (Woodruff 1971): m - m_true ≈ mean(u) with u = (D - m·T) / T̄, T̄ the mean cluster size, so
the variance of m is the variance of a plain mean of u. With equal cluster sizes this is exact.

Clustered (conditional on the noise draws): the seeds of a cell are averaged per cluster first, and the
clusters (documents; windows when no document id is stored) are the independent units:
    se² = G / (G - 1) · Σ_c (D̄_c - m·T_c)² / (Σ_c T_c)²,      df = G - 1.
This is the CR1 cluster-robust sandwich of a weighted mean (weights T, the statsmodels WLS
``cov_type="cluster"`` estimate, tested equal) with t on G - 1 degrees of freedom (Cameron & Miller 2015,
"A Practitioner's Guide to Cluster-Robust Inference", J. Human Resources 50(2), §II.C and §VI).

Across draws (seed as a random factor): the seeds × clusters table of u is a two-way crossed random-effects
design without replication, u_sc = a_s + b_c + e_sc with a (draw), b (document) and e independent. The grand
mean's variance is σ_a²/S + σ_b²/G + σ_e²/(S·G). The variance components are the ANOVA (method-of-moments)
estimates, which are also the REML estimates for a balanced design when non-negative (Searle, Casella &
McCulloch 1992, "Variance Components", §4.7 and §6.3): with MS_A, MS_B, MS_E the seed, cluster and residual
mean squares, σ_a² = (MS_A - MS_E)/G, σ_b² = (MS_B - MS_E)/S, σ_e² = MS_E, each truncated at 0, so
    se² = (max(MS_A, MS_E) + max(MS_B, MS_E) - MS_E) / (S·G),
with Satterthwaite (1946) degrees of freedom for that linear combination of mean squares. Why this and not
statsmodels MixedLM: the design is balanced by construction (every seed scores the same windows), where
the closed form equals the REML fit, is exact to compute for thousands of cells in one pass, and never fails
to converge; MixedLM with crossed effects needs a per-cell iterative fit. Why not a seed × document
bootstrap: with 2-3 seeds a bootstrap over seeds has 3-10 distinct resamples and no small-sample
correction, while the t with Satterthwaite df widens the interval honestly (df ≈ S - 1 when draws dominate).
The interval's coverage is tested on simulated seeds × documents data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def clustered_ratio_test(per_cluster: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per cell: mean, cluster-robust SE, t, df, two-sided p and (1 - alpha) CI.

    per_cluster: one row per (cell, cluster) with columns _cell, d (seed-averaged ΔNLL sum, nats), t (tokens).
    Returns a frame indexed by _cell with columns n_clusters, mean, se, t_stat, df, p_value, ci_low, ci_high.
    Cells with fewer than 2 clusters get NaN se/t/p/CI (the caller says why). A zero SE with a zero mean
    gives t = 0, p = 1; a zero SE with a non-zero mean gives t = ±inf, p = 0.
    """
    cell = per_cluster["_cell"]
    g = per_cluster.groupby(cell).size()
    sum_t = per_cluster["t"].groupby(cell).sum()
    sum_d = per_cluster["d"].groupby(cell).sum(min_count=1)
    sum_d[per_cluster["d"].isna().groupby(cell).any()] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sum_d / sum_t
        resid = per_cluster["d"] - cell.map(mean) * per_cluster["t"]
        ss = (resid**2).groupby(cell).sum()
        se = np.sqrt(g / (g - 1) * ss) / sum_t
    df = (g - 1).astype(float).where(g >= 2)
    return _t_columns(pd.DataFrame({"n_clusters": g, "mean": mean, "se": se, "df": df}), alpha)


def across_draws_test(per_seed_cluster: pd.DataFrame, mean: pd.Series, alpha: float) -> pd.DataFrame:
    """Per cell: two-way (seed × cluster) random-effects SE of the mean, Satterthwaite df, t, p, CI.

    per_seed_cluster: one row per (cell, seed, cluster) with columns _cell, seed, cluster, d (ΔNLL sum), t
    (tokens); every cell must be balanced (each seed has every cluster with the same tokens) and finite, with
    at least 2 seeds and 2 clusters: the caller checks that. mean: the cell's ratio mean (index _cell).
    Returns a frame indexed by _cell with columns mean, se, t_stat, df, p_value, ci_low, ci_high,
    sigma_draw (the estimated between-draw SD of the per-token ΔNLL).
    """
    frame = per_seed_cluster
    cell = frame["_cell"]
    n_seeds = frame.groupby("_cell")["seed"].nunique()
    n_clusters = frame.groupby("_cell")["cluster"].nunique()
    t_bar = frame["t"].groupby(cell).sum() / (n_seeds * n_clusters)
    # [rows] linearised residuals in per-token units, mean 0 per cell
    u = (frame["d"] - cell.map(mean) * frame["t"]) / cell.map(t_bar)
    grand = u.groupby(cell).transform("mean")
    seed_mean = u.groupby([cell, frame["seed"]]).transform("mean")
    cluster_mean = u.groupby([cell, frame["cluster"]]).transform("mean")
    ss_seed = ((seed_mean - grand) ** 2).groupby(cell).sum()  # = G Σ_s (ū_s - ū)²
    ss_cluster = ((cluster_mean - grand) ** 2).groupby(cell).sum()  # = S Σ_c (ū_c - ū)²
    ss_resid = ((u - seed_mean - cluster_mean + grand) ** 2).groupby(cell).sum()
    df_a, df_b = n_seeds - 1, n_clusters - 1
    df_e = df_a * df_b
    ms_a, ms_b, ms_e = ss_seed / df_a, ss_cluster / df_b, ss_resid / df_e
    # the truncated ANOVA estimate as Σ c_i MS_i: c = (1, 1, -1), (0, 1, 0), (1, 0, 0) or (0, 0, 1)
    c_a = (ms_a >= ms_e).astype(float)
    c_b = (ms_b >= ms_e).astype(float)
    c_e = 1.0 - c_a - c_b
    combo = c_a * ms_a + c_b * ms_b + c_e * ms_e
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(combo / (n_seeds * n_clusters))
        denominator = (c_a * ms_a) ** 2 / df_a + (c_b * ms_b) ** 2 / df_b + (c_e * ms_e) ** 2 / df_e
        df = combo**2 / denominator  # Satterthwaite (1946)
        sigma_draw = np.sqrt(np.maximum(ms_a - ms_e, 0.0) / n_clusters)
    df = df.where(denominator > 0, (n_seeds - 1).astype(float))  # zero variance: df is moot, keep it finite
    out = _t_columns(pd.DataFrame({"mean": mean.reindex(n_seeds.index), "se": se, "df": df}), alpha)
    out["sigma_draw"] = sigma_draw
    return out


def _t_columns(out: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Adds t_stat, p_value, ci_low, ci_high from mean, se, df (NaN where df is NaN)."""
    mean, se, df = out["mean"], out["se"], out["df"]
    with np.errstate(invalid="ignore", divide="ignore"):
        t_stat = np.where((se == 0) & (mean == 0), 0.0, mean / se)
        p = 2 * stats.t.sf(np.abs(t_stat), df.fillna(1))
        half = stats.t.ppf(1 - alpha / 2, df.fillna(1)) * se
    valid = df.notna().to_numpy() & np.isfinite(mean.to_numpy())
    out["t_stat"] = np.where(valid, t_stat, np.nan)
    out["p_value"] = np.where(valid, p, np.nan)
    out["ci_low"] = np.where(valid, mean - half, np.nan)
    out["ci_high"] = np.where(valid, mean + half, np.nan)
    return out
