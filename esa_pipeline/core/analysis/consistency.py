"""Layer profiles, their agreement across seeds, and the critical (most sensitive) layers.

A layer profile is mean ΔNLL per layer for one (model, kind, component, strength). Rows without a layer
(the input embedding) have no place in a profile and are left out of seed_consistency and critical_layers.
MoE: an all-experts row (expert NULL) is the component's measurement; single-expert rows are averaged only
where no all-experts row exists (see _common.collapse_experts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from esa_pipeline.core.analysis._common import (
    as_nullable_int,
    check_unique,
    collapse_experts,
    depth_of,
    n_layers_by_model,
    nan_propagating_mean,
    require_columns,
)

PROFILE_KEYS = ["model", "kind", "component", "strength"]
SENSITIVITY_KEYS = [*PROFILE_KEYS, "layer", "expert", "seed"]
SEED_CONSISTENCY_COLUMNS = [
    "model",
    "kind",
    "component",
    "strength",
    "seed_a",
    "seed_b",
    "spearman_rho",
    "n_layers",
]
CRITICAL_LAYERS_COLUMNS = [
    "model",
    "kind",
    "component",
    "strength",
    "layer",
    "depth",
    "mean_delta_nll",
    "rank",
    "is_critical",
]
OVERALL_COMPONENT = "all"


def layer_profiles(
    sensitivity: pd.DataFrame, *, per_seed: bool = False, function: str = "layer_profiles"
) -> pd.DataFrame:
    """Mean ΔNLL per (model, kind, component, strength, layer), averaged over seeds unless per_seed.

    Columns: model, kind, component, strength, [seed,] layer, mean_delta_nll. Embedding rows keep layer NULL.
    A NaN delta_nll (the model produced NaN losses) makes the mean NaN rather than being skipped.
    """
    require_columns(sensitivity, SENSITIVITY_KEYS + ["delta_nll"], function=function, relation="sensitivity")
    rows = sensitivity[SENSITIVITY_KEYS + ["delta_nll"]].copy()
    rows["layer"] = as_nullable_int(rows["layer"])
    rows["expert"] = as_nullable_int(rows["expert"])
    rows["delta_nll"] = rows["delta_nll"].astype(float)
    check_unique(
        sensitivity.assign(layer=rows["layer"], expert=rows["expert"]),
        SENSITIVITY_KEYS,
        function=function,
        relation="sensitivity",
    )
    per_seed_rows = collapse_experts(rows, [*PROFILE_KEYS, "seed", "layer"], "delta_nll")
    keys = [*PROFILE_KEYS, "seed", "layer"] if per_seed else [*PROFILE_KEYS, "layer"]
    profiles = per_seed_rows if per_seed else nan_propagating_mean(per_seed_rows, keys, "delta_nll")
    profiles = profiles.rename(columns={"delta_nll": "mean_delta_nll"})
    profiles["layer"] = as_nullable_int(profiles["layer"])
    return profiles[[*keys, "mean_delta_nll"]]


def seed_consistency(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ between the layer profiles of every pair of seeds, per (model, kind, component, strength).

    Only layers measured (non-NaN) in both seeds count; n_layers says how many. ρ is NaN with fewer than 3
    common layers (2 points always give ±1) or when a profile is constant (ranks undefined).
    """
    profiles = layer_profiles(sensitivity, per_seed=True, function="seed_consistency")
    profiles = profiles.loc[profiles["layer"].notna()]
    rows = []
    for key, group in profiles.groupby(PROFILE_KEYS, sort=True):
        by_layer = group.pivot(index="layer", columns="seed", values="mean_delta_nll")
        for seed_a, seed_b in combinations(sorted(by_layer.columns), 2):
            pair = by_layer[[seed_a, seed_b]].dropna()
            rows.append((*key, seed_a, seed_b, _spearman(pair[seed_a], pair[seed_b]), len(pair)))
    out = pd.DataFrame(rows, columns=SEED_CONSISTENCY_COLUMNS)
    return out.astype({"n_layers": int})


def _spearman(a: pd.Series, b: pd.Series) -> float:
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(stats.spearmanr(a.to_numpy(), b.to_numpy()).statistic)


def critical_layers(
    profile_source: pd.DataFrame,
    n_layers: pd.DataFrame | Mapping[str, int],
    *,
    top_fraction: float = 0.10,
) -> pd.DataFrame:
    """Every measured layer ranked by mean ΔNLL, with the top `top_fraction` flagged is_critical.

    profile_source: the `sensitivity` relation (averaged over seeds here) or the `significance` relation
    (its mean_delta_nll). n_layers: the `models` relation or {model: n_layers}; depth = layer / n_layers.
    Per (model, kind, component, strength) and overall (component "all": per layer, the mean over the
    components measured there). Rank 1 = most sensitive; ties go to the shallower layer; NaN ranks last and
    is never critical. k = max(1, floor(top_fraction × measured layers)): at most that fraction, at least one.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"critical_layers(): top_fraction must be in (0, 1], got {top_fraction}")
    lookup = n_layers_by_model(n_layers, function="critical_layers")
    profiles = _profiles_from(profile_source)
    profiles = profiles.loc[profiles["layer"].notna()]
    overall = nan_propagating_mean(profiles, ["model", "kind", "strength", "layer"], "mean_delta_nll")
    overall["component"] = OVERALL_COMPONENT
    ranked = pd.concat([profiles, overall], ignore_index=True)
    ranked = ranked.sort_values(
        [*PROFILE_KEYS, "mean_delta_nll", "layer"],
        ascending=[True] * 4 + [False, True],
        na_position="last",
        kind="mergesort",
    )
    ranked["rank"] = ranked.groupby(PROFILE_KEYS, sort=False).cumcount() + 1
    n_measured = ranked.groupby(PROFILE_KEYS, sort=False)["layer"].transform("size")
    k = np.maximum(1, np.floor(top_fraction * n_measured + 1e-9)).astype(int)
    ranked["is_critical"] = (ranked["rank"] <= k) & ranked["mean_delta_nll"].notna()
    ranked["layer"] = as_nullable_int(ranked["layer"])
    ranked["depth"] = depth_of(ranked["layer"], ranked["model"], lookup, function="critical_layers")
    ranked = ranked.sort_values([*PROFILE_KEYS, "rank"], kind="mergesort")
    return ranked[CRITICAL_LAYERS_COLUMNS].reset_index(drop=True)


def _profiles_from(source: pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame) and "mean_delta_nll" in source.columns:
        require_columns(
            source,
            [*PROFILE_KEYS, "layer", "mean_delta_nll"],
            function="critical_layers",
            relation="significance",
        )
        rows = source.copy()
        rows["layer"] = as_nullable_int(rows["layer"])
        if "expert" in rows.columns:
            rows["expert"] = as_nullable_int(rows["expert"])
        keys = [*PROFILE_KEYS, "layer"] + (["expert"] if "expert" in rows.columns else [])
        check_unique(rows, keys, function="critical_layers", relation="significance")
        return collapse_experts(rows, [*PROFILE_KEYS, "layer"], "mean_delta_nll")
    if isinstance(source, pd.DataFrame) and "delta_nll" in source.columns:
        return layer_profiles(source, function="critical_layers")
    raise ValueError(
        "critical_layers(): profile_source must be the `sensitivity` relation (column delta_nll) or the "
        "`significance` relation (column mean_delta_nll)"
    )


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| of two collections taken as sets (e.g. two top-k index sets).

    NaN when both are empty: overlap of nothing with nothing is undefined, not perfect agreement.
    """
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    if not union:
        return math.nan
    return len(set_a & set_b) / len(union)
