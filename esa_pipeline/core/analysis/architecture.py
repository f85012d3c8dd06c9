"""Comparing sensitivity across architectures: profiles on normalised depth, component rankings, and
group contrasts (dense vs MoE, instruct vs base).

Random-weight models (models.random_weights) are plumbing checks and never enter a comparison: their rows
are left out here, so an experiment of tiny models only gives empty relations, not a finding.

Models have different depths, so layers are placed at depth = layer / n_layers and binned into equal-width
depth bins; a component's rank within a model is by its mean ΔNLL over the layers measured (1 = most
sensitive, ties share the lower rank).

Group contrasts treat the model as the unit: a model's sensitivity for (kind, component, strength) is its
mean ΔNLL over layers, and the two groups of models are compared with Welch's t-test and the Mann–Whitney U
test. With the usual portfolio (one MoE model, one or two instruct models) these tests have almost no power;
the rows say so in `warnings` instead of being left out. The contrasts are not paired (no instruct/base pair
of the same base model is assumed). Both functions return GROUP_COMPARISON_COLUMNS so they can be stored
together in one relation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from esa_pipeline.core.analysis._common import (
    models_frame,
    nan_propagating_mean,
    require_columns,
    require_known_models,
)
from esa_pipeline.core.analysis.consistency import OVERALL_COMPONENT, layer_profiles

ARCHITECTURE_COLUMNS = [
    "model",
    "family",
    "is_moe",
    "instruct",
    "kind",
    "component",
    "strength",
    "layer",
    "depth",
    "depth_bin",
    "mean_delta_nll",
    "component_rank",
]
GROUP_COMPARISON_COLUMNS = [
    "comparison",
    "kind",
    "component",
    "strength",
    "group_a",
    "group_b",
    "n_a",
    "n_b",
    "models_a",
    "models_b",
    "mean_a",
    "mean_b",
    "difference",
    "welch_t",
    "welch_p",
    "mannwhitney_u",
    "mannwhitney_p",
    "warnings",
]


def depth_bins(depth: pd.Series, n_bins: int = 10) -> pd.Series:
    """Equal-width bins of [0, 1): bin i holds i/n_bins <= depth < (i+1)/n_bins. NULL where depth is NaN."""
    if n_bins < 1:
        raise ValueError(f"depth_bins(): n_bins must be >= 1, got {n_bins}")
    # the small epsilon keeps exact boundaries (e.g. 0.3 = 3/10 stored as 0.29999...) in the upper bin
    bins = np.floor(depth.astype(float) * n_bins + 1e-9).clip(upper=n_bins - 1)
    return bins.astype("Int64")


def architecture_comparison(
    sensitivity: pd.DataFrame, models: pd.DataFrame, *, n_bins: int = 10
) -> pd.DataFrame:
    """Seed-averaged layer profiles of every model with depth, depth_bin, model metadata and component_rank.

    The embedding (layer NULL) keeps a row with NULL depth/depth_bin and takes part in component ranking.
    `component` is the role (adapters.role_of): old alias names are mapped per model family.
    Models with random_weights true are left out (plumbing only).
    """
    profiles = layer_profiles(sensitivity, function="architecture_comparison")
    meta = models_frame(
        models,
        ["family", "is_moe", "instruct", "n_layers", "random_weights"],
        function="architecture_comparison",
    )
    require_known_models(profiles["model"].unique(), meta.index, function="architecture_comparison")
    profiles = profiles.loc[~profiles["model"].map(meta["random_weights"].fillna(False).astype(bool))]
    out = profiles.join(meta[["family", "is_moe", "instruct", "n_layers"]], on="model")
    # Compare by role: an old alias (norm.post_attention) means norm.ffn_in in Llama but norm.attn_out in Gemma2.
    from esa_pipeline.core.models.adapters.base import role_of

    out["component"] = [role_of(c, f) for c, f in zip(out["component"], out["family"], strict=True)]

    layer = out["layer"].astype("Float64").astype(float)
    out_of_range = (layer < 0) | (layer >= out["n_layers"])
    if out_of_range.any():
        bad = out.loc[out_of_range].iloc[0]
        raise ValueError(
            f"architecture_comparison(): layer {bad['layer']} of {bad['model']!r} is outside 0..{bad['n_layers'] - 1}; "
            "the models frame does not describe the model that was swept"
        )
    out["depth"] = layer / out["n_layers"]
    out["depth_bin"] = depth_bins(out["depth"], n_bins)

    by_component = nan_propagating_mean(out, ["model", "kind", "strength", "component"], "mean_delta_nll")
    # an overflowed component (inf/NaN mean ΔNLL) is the most sensitive: it ranks first, never unranked
    rank_key = by_component["mean_delta_nll"].astype(float).where(lambda v: np.isfinite(v) | (v < 0), np.inf)
    by_component["component_rank"] = (
        rank_key.groupby([by_component[c] for c in ("model", "kind", "strength")])
        .rank(method="min", ascending=False)
        .astype("Int64")
    )
    out = out.merge(
        by_component[["model", "kind", "strength", "component", "component_rank"]],
        on=["model", "kind", "strength", "component"],
        how="left",
    )
    out = out.sort_values(["model", "kind", "component", "strength", "layer"], kind="mergesort")
    return out[ARCHITECTURE_COLUMNS].reset_index(drop=True)


def dense_vs_moe(comparison: pd.DataFrame, models: pd.DataFrame | None = None) -> pd.DataFrame:
    """MoE (group_a) minus dense (group_b) model-level mean ΔNLL per (kind, component, strength) and "all"."""
    return _compare_groups(comparison, "is_moe", ("moe", "dense"), "dense_vs_moe", models)


def instruct_vs_base(comparison: pd.DataFrame, models: pd.DataFrame | None = None) -> pd.DataFrame:
    """Instruct (group_a) minus base (group_b) model-level mean ΔNLL per (kind, component, strength) and "all"."""
    return _compare_groups(comparison, "instruct", ("instruct", "base"), "instruct_vs_base", models)


def _compare_groups(
    comparison: pd.DataFrame,
    flag: str,
    labels: tuple[str, str],
    name: str,
    models: pd.DataFrame | None,
) -> pd.DataFrame:
    require_columns(
        comparison,
        ["model", flag, "kind", "component", "strength", "mean_delta_nll"],
        function=name,
        relation="architecture_comparison",
    )
    random_models: set[str] = set()
    if models is not None:
        meta = models_frame(models, ["random_weights"], function=name)
        require_known_models(comparison["model"].unique(), meta.index, function=name)
        random_models = {str(m) for m in meta.index[meta["random_weights"].fillna(False).astype(bool)]}
    # random-weight models never enter a contrast (architecture_comparison already leaves them out)
    comparison = comparison.loc[~comparison["model"].astype(str).isin(random_models)]

    per_model = nan_propagating_mean(
        comparison, ["model", flag, "kind", "component", "strength"], "mean_delta_nll"
    )
    overall = nan_propagating_mean(per_model, ["model", flag, "kind", "strength"], "mean_delta_nll")
    per_model = pd.concat([per_model, overall.assign(component=OVERALL_COMPONENT)], ignore_index=True)

    rows = []
    for (kind, component, strength), cell in per_model.groupby(["kind", "component", "strength"], sort=True):
        rows.append(
            {
                "comparison": name,
                "kind": kind,
                "component": component,
                "strength": strength,
                **_contrast(cell, flag, labels, random_models),
            }
        )
    return pd.DataFrame(rows, columns=GROUP_COMPARISON_COLUMNS)


def _contrast(cell: pd.DataFrame, flag: str, labels: tuple[str, str], random_models: set[str]) -> dict:
    warnings: list[str] = []
    finite = np.isfinite(cell["mean_delta_nll"])
    if not finite.all():
        dropped = sorted(cell.loc[~finite, "model"])
        warnings.append(f"{len(dropped)} model(s) with non-finite ΔNLL left out ({', '.join(dropped)})")
    cell = cell.loc[finite]
    in_a = cell[flag].astype(bool)
    a, b = cell.loc[in_a, "mean_delta_nll"], cell.loc[~in_a, "mean_delta_nll"]
    result = {
        "group_a": labels[0],
        "group_b": labels[1],
        "n_a": len(a),
        "n_b": len(b),
        "models_a": ";".join(sorted(cell.loc[in_a, "model"])),
        "models_b": ";".join(sorted(cell.loc[~in_a, "model"])),
        "mean_a": a.mean() if len(a) else np.nan,
        "mean_b": b.mean() if len(b) else np.nan,
        "welch_t": np.nan,
        "welch_p": np.nan,
        "mannwhitney_u": np.nan,
        "mannwhitney_p": np.nan,
    }
    result["difference"] = result["mean_a"] - result["mean_b"]
    if len(a) < 2 or len(b) < 2:
        warnings.append(
            f"fewer than 2 models in a group ({labels[0]}: {len(a)}, {labels[1]}: {len(b)}): no test; "
            "the difference is descriptive only"
        )
    elif a.var() + b.var() == 0:
        warnings.append("no spread within either group: Welch's t is undefined")
        result.update(_mann_whitney(a, b))
    else:
        welch = stats.ttest_ind(a, b, equal_var=False)
        result.update(welch_t=float(welch.statistic), welch_p=float(welch.pvalue), **_mann_whitney(a, b))
    if random_models:
        warnings.append(f"random-weight models left out (plumbing only): {', '.join(sorted(random_models))}")
    result["warnings"] = "; ".join(warnings)
    return result


def _mann_whitney(a: pd.Series, b: pd.Series) -> dict:
    test = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {"mannwhitney_u": float(test.statistic), "mannwhitney_p": float(test.pvalue)}
