"""Paired statistics of zero-shot accuracy under perturbation, and where perplexity and tasks disagree.

Items are paired (the same item scored before and after a perturbation), so the tests are paired:
- exact McNemar test on the discordant items (statsmodels `contingency_tables.mcnemar(exact=True)`: a two-sided
  binomial test of `lost` vs `gained` with p = 1/2); no discordant item gives p = 1 exactly;
- a 95% CI for the accuracy difference (after - before) by Agresti & Min (2005, "Simple improved confidence
  intervals for comparing matched proportions", Stat. Med. 24:729): the Wald interval for matched pairs after
  adding 1/2 to each of the four cells, which keeps its coverage near 95% even with few discordant items;
- Holm and Benjamini-Hochberg corrections (statsmodels `multipletests`) across every (point, task) of a model,
  as the perplexity cells are corrected in `significance`.

`task_vs_perplexity` relates the two measurements per model: Spearman's rank correlation (scipy) between ΔNLL
and Δaccuracy over the points measured both ways, with a Fisher-z CI using the Bonett & Wright (2000) variance
(1 + rho²/2)/(n - 3); and per point a rank disagreement (which points hurt perplexity much more than tasks,
and the reverse).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from esa_pipeline.core.analysis._common import require_columns, spearman_test

SPEC_COLUMNS = ["kind", "component", "layer", "expert", "strength", "seed", "mode", "selection", "group_size"]
POINT_KEYS = ["model", "task", *SPEC_COLUMNS]
SUMMARY_COLUMNS = [
    *POINT_KEYS, "n_items", "n_both", "n_lost", "n_gained", "n_neither", "accuracy_before", "accuracy_after",
    "delta_accuracy", "ci_low", "ci_high", "mcnemar_p", "p_holm", "p_bh", "significant_holm", "significant_bh",
    "mean_margin_before", "mean_margin_after", "restored", "random_weights", "note",
]  # fmt: skip
CORRELATION_COLUMNS = ["model", "task", "n_points", "spearman_rho", "ci_low", "ci_high", "p_value", "note"]
DISAGREEMENT_COLUMNS = [
    *POINT_KEYS, "delta_nll", "delta_accuracy", "mcnemar_p", "nll_rank_pct", "task_rank_pct", "disagreement",
    "direction", "disagreement_rank",
]  # fmt: skip
ALL_TASKS = "all"
MIN_POINTS_FOR_CORRELATION = 4
NOT_RANKED = "not_ranked"  # `direction` of every point of a (model, task) whose rank correlation has no value
NOTE_NO_ITEMS = "no items: nothing to test"
NOTE_NO_DISCORDANT = "no item changed: exact McNemar p = 1"
NOTE_NO_ANSWER = "{n} items had non-finite log-likelihoods after the perturbation (no answer): counted as wrong"
ITEM_COLUMNS_NEEDED = [*POINT_KEYS, "item_id", "correct_before", "correct_after", "margin_before", "margin_after",
                       "restored"]  # fmt: skip


def mcnemar_exact_p(n_lost: int, n_gained: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (statsmodels)."""
    return float(mcnemar([[0, n_lost], [n_gained, 0]], exact=True).pvalue)


def paired_difference_ci(n_both: int, n_lost: int, n_gained: int, n_neither: int,
                         alpha: float = 0.05) -> tuple[float, float]:  # fmt: skip
    """Agresti-Min CI for accuracy(after) - accuracy(before) of matched binary outcomes.

    n_both: correct before and after; n_lost: correct before only; n_gained: after only; n_neither: neither.
    Returns (low, high) clipped to [-1, 1]; (nan, nan) with no items.
    """
    n = n_both + n_lost + n_gained + n_neither
    if n == 0:
        return math.nan, math.nan
    lost, gained, total = n_lost + 0.5, n_gained + 0.5, n + 2.0
    diff = (gained - lost) / total
    se = math.sqrt(max((lost + gained) - (gained - lost) ** 2 / total, 0.0)) / total
    z = float(stats.norm.ppf(1 - alpha / 2))
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)


def zero_shot_summary(items: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per (model, task, point) of `zero_shot_sensitivity` item rows; columns SUMMARY_COLUMNS."""
    require_columns(items, ITEM_COLUMNS_NEEDED, function="zero_shot_summary", relation="zero_shot_sensitivity")
    rows = []
    for key, group in items.groupby(POINT_KEYS, dropna=False, sort=True):
        before, after = group["correct_before"].astype(bool), group["correct_after"].astype(bool)
        counts = {
            "n_both": int((before & after).sum()), "n_lost": int((before & ~after).sum()),
            "n_gained": int((~before & after).sum()), "n_neither": int((~before & ~after).sum()),
        }  # fmt: skip
        n = len(group)
        low, high = paired_difference_ci(**counts, alpha=alpha)
        if n == 0:
            p, note = math.nan, NOTE_NO_ITEMS
        else:
            p = mcnemar_exact_p(counts["n_lost"], counts["n_gained"])
            note = NOTE_NO_DISCORDANT if counts["n_lost"] + counts["n_gained"] == 0 else ""
            unanswered = int(group["pred_after"].isna().sum()) if "pred_after" in group else 0
            if unanswered:
                note = "; ".join(filter(None, [note, NOTE_NO_ANSWER.format(n=unanswered)]))
        rows.append({
            **dict(zip(POINT_KEYS, key, strict=True)), "n_items": n, **counts,
            "accuracy_before": float(before.mean()), "accuracy_after": float(after.mean()),
            "delta_accuracy": float(after.mean() - before.mean()), "ci_low": low, "ci_high": high, "mcnemar_p": p,
            "mean_margin_before": float(group["margin_before"].mean()),
            "mean_margin_after": float(group["margin_after"].mean()),
            "restored": bool((group["restored"] == True).all()),  # noqa: E712  (None fails)
            "random_weights": bool(group["random_weights"].any()) if "random_weights" in group else None,
            "note": note,
        })  # fmt: skip
    out = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS if c not in ("p_holm", "p_bh", "significant_holm",
                                                                            "significant_bh")])  # fmt: skip
    out = _adjust_per_model(out, alpha)
    for column in ("layer", "expert", "group_size"):
        out[column] = pd.to_numeric(out[column]).astype("Int64")
    return out[SUMMARY_COLUMNS]


def _adjust_per_model(out: pd.DataFrame, alpha: float) -> pd.DataFrame:
    out = out.copy()
    for column in ("p_holm", "p_bh"):
        out[column] = np.nan
    for column in ("significant_holm", "significant_bh"):
        out[column] = pd.Series(pd.NA, index=out.index, dtype="boolean")
    for _, index in out.groupby("model").groups.items():
        p = out.loc[index, "mcnemar_p"]
        tested = p.notna()
        if not tested.any():
            continue
        where = p.index[tested]
        for method, column in (("holm", "p_holm"), ("fdr_bh", "p_bh")):
            adjusted = multipletests(p[tested].to_numpy(), alpha=alpha, method=method)[1]
            out.loc[where, column] = adjusted
            out.loc[where, column.replace("p_", "significant_")] = adjusted < alpha
    return out


def _pooled(summary: pd.DataFrame) -> pd.DataFrame:
    """Every task of a point pooled into one "all" row (accuracy over all items)."""
    keys = ["model", *SPEC_COLUMNS]
    sums = summary.groupby(keys, dropna=False)[["n_items", "n_lost", "n_gained"]].sum().reset_index()
    sums["task"] = ALL_TASKS
    sums["delta_accuracy"] = (sums["n_gained"] - sums["n_lost"]) / sums["n_items"].where(sums["n_items"] > 0)
    sums["mcnemar_p"] = [mcnemar_exact_p(int(a), int(b)) if n else math.nan
                         for a, b, n in zip(sums["n_lost"], sums["n_gained"], sums["n_items"], strict=True)]  # fmt: skip
    return sums


def _with_delta_nll(summary: pd.DataFrame, sensitivity: pd.DataFrame) -> pd.DataFrame:
    require_columns(sensitivity, ["model", *SPEC_COLUMNS[:-1], "delta_nll"], function="task_vs_perplexity",
                    relation="sensitivity")  # fmt: skip
    sens = sensitivity.copy()
    if "group_size" not in sens.columns:  # rows stored before quantize existed
        sens["group_size"] = pd.NA
    sens = sens[["model", *SPEC_COLUMNS, "delta_nll"]]
    frames = [summary[POINT_KEYS + ["delta_accuracy", "mcnemar_p"]], _pooled(summary)[POINT_KEYS + ["delta_accuracy",
                                                                                                  "mcnemar_p"]]]
    points = pd.concat(frames, ignore_index=True)
    for frame in (points, sens):
        for column in ("layer", "expert", "group_size"):
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        frame["strength"] = frame["strength"].astype(float)
        frame["seed"] = pd.to_numeric(frame["seed"]).astype("Int64")  # NULL: a seed-independent point
    if sens.duplicated(["model", *SPEC_COLUMNS]).any():
        raise ValueError("task_vs_perplexity(): `sensitivity` has several rows per point (two datasets?): pass the "
                         "rows of the sweep dataset only")  # fmt: skip
    return points.merge(sens, on=["model", *SPEC_COLUMNS], how="inner")


def task_vs_perplexity(summary: pd.DataFrame, sensitivity: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(correlations, disagreements) over the points measured both ways.

    correlations: per (model, task) and (model, "all"): Spearman rho of ΔNLL vs Δaccuracy (expected negative),
    95% Fisher-z CI, p-value; NaN with a note below MIN_POINTS_FOR_CORRELATION points or without variation.
    A point whose ΔNLL is non-finite (the loss overflowed) ranks as the largest ΔNLL and the note counts it.
    disagreements: per point, the percentile ranks of ΔNLL and of -Δaccuracy (1 = most damage among the
    model's points), disagreement = nll_rank_pct - task_rank_pct (> 0: perplexity hurt more than the tasks,
    "perplexity_only"; < 0: "task_only"; NOT_RANKED when the (model, task) has no rank correlation — fewer than
    MIN_POINTS_FOR_CORRELATION points or no variation, its note says which — where rank differences are chance), disagreement_rank 1 = largest |disagreement|.
    """
    both = _with_delta_nll(summary, sensitivity)
    correlations, disagreements = [], []
    # every measured (model, task) gets its row, also when none of its points is a sweep point (a grid off the
    # sweep): n_points 0 and the reason, never a missing row
    measured = pd.concat([summary[["model", "task"]], _pooled(summary)[["model", "task"]]]).drop_duplicates()
    groups = dict(tuple(both.groupby(["model", "task"], sort=True)))
    for model, task in sorted(measured.itertuples(index=False, name=None)):
        group = groups.get((model, task), both.iloc[:0])
        usable = group.loc[group["delta_accuracy"].notna()].copy()
        # an overflowed loss (inf/NaN ΔNLL) is the most sensitive outcome: it ranks as the largest ΔNLL, never
        # dropped (top_delta_nll picks such points first); the stored delta_nll stays as measured
        overflowed = int((~np.isfinite(usable["delta_nll"].astype(float))).sum())
        usable["_nll_key"] = usable["delta_nll"].astype(float).where(lambda v: np.isfinite(v), np.inf)
        fit = _spearman(usable)
        if overflowed:
            counted = f"{overflowed} point{'s' if overflowed > 1 else ''} with non-finite ΔNLL (loss overflowed) " \
                      "ranked as the largest"
            fit["note"] = "; ".join(filter(None, [fit["note"], counted]))
        correlations.append({"model": model, "task": task, "n_points": len(usable), **fit})
        if usable.empty:
            continue
        ranked = usable
        ranked["nll_rank_pct"] = ranked["_nll_key"].rank(pct=True)
        ranked["task_rank_pct"] = (-ranked["delta_accuracy"]).rank(pct=True)
        ranked["disagreement"] = ranked["nll_rank_pct"] - ranked["task_rank_pct"]
        ranked["direction"] = np.where(ranked["disagreement"] > 0, "perplexity_only",
                                       np.where(ranked["disagreement"] < 0, "task_only", "agree"))  # fmt: skip
        if math.isnan(fit["spearman_rho"]):
            # 2-3 points, or Δaccuracy (or ΔNLL) equal everywhere: the ranks are kept, no direction is claimed
            ranked["direction"] = NOT_RANKED
        ranked["disagreement_rank"] = ranked["disagreement"].abs().rank(ascending=False, method="first").astype(int)
        disagreements.append(ranked)
    corr = pd.DataFrame(correlations, columns=CORRELATION_COLUMNS)
    points = (pd.concat(disagreements, ignore_index=True)[DISAGREEMENT_COLUMNS] if disagreements
              else pd.DataFrame(columns=DISAGREEMENT_COLUMNS))  # fmt: skip
    return corr, points.sort_values(["model", "task", "disagreement_rank"], ignore_index=True)


def _spearman(points: pd.DataFrame) -> dict:
    n = len(points)
    if n < MIN_POINTS_FOR_CORRELATION:
        return {"spearman_rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "note": f"{n} points measured both ways; a rank correlation needs >= {MIN_POINTS_FOR_CORRELATION}"}
    x, y = points["_nll_key"], points["delta_accuracy"].astype(float)  # _nll_key: ΔNLL, overflow = +inf
    if x.nunique() < 2 or y.nunique() < 2:
        which = "Δaccuracy" if y.nunique() < 2 else "ΔNLL"
        return {"spearman_rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "note": f"{which} is the same at every point: no rank correlation"}
    # ranks first: an overflowed point's +inf key is the largest rank (spearman_test refuses non-finite values);
    # the p-value is exact for few points
    rho, p_value = spearman_test(stats.rankdata(x), y)
    if n > 3 and abs(rho) < 1:
        se = math.sqrt((1 + rho**2 / 2) / (n - 3))
        z = math.atanh(rho)
        half = float(stats.norm.ppf(0.975)) * se
        low, high = math.tanh(z - half), math.tanh(z + half)
    else:
        low = high = rho
    return {"spearman_rho": rho, "ci_low": low, "ci_high": high, "p_value": p_value, "note": ""}
