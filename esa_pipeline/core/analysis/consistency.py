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
    "note",  # why spearman_rho is NULL ("" when it is not)
]
CRITICAL_LAYERS_COLUMNS = [
    "model",
    "kind",
    "component",
    "strength",
    "layer",
    "depth",
    "mean_delta_nll",
    "significant",
    "rank",
    "is_critical",
    "note",
]
NOTE_NONE_SIGNIFICANT = "none significant: no layer's effect survives the correction, so no layer is critical"
NOTE_NONE_TESTED = ("none tested: no layer's cell could be tested (significance.note says why, e.g. one seed of a "
                    "stochastic kind), so critical layers cannot be chosen")  # fmt: skip
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

    Only stochastic settings: rows with seed NULL, `deterministic` true, a deterministic kind (norm `scale`,
    compression kinds) or a top/bottom selection (not noise on top/bottom neurons, still seeded) are left out: their profiles agree across seeds by
    construction (ρ = 1, a check that cannot fail).

    Only layers measured (non-NaN) in both seeds count; n_layers says how many. ρ is NaN with fewer than 3
    common layers (2 points always give ±1) or when a profile is constant (ranks undefined); `note` says which.
    """
    require_columns(sensitivity, ["seed"], function="seed_consistency", relation="sensitivity")
    # deterministic kinds are measured once (seed NULL, or a true `deterministic` column): a rank correlation
    # of a profile with itself is 1 by construction, a check that cannot fail, so only stochastic rows count
    from esa_pipeline.core.perturbation.perturb import seed_independent_rows

    stochastic = sensitivity["seed"].notna() & ~seed_independent_rows(sensitivity)
    if "deterministic" in sensitivity.columns:
        stochastic &= ~sensitivity["deterministic"].fillna(False).astype(bool)
    profiles = layer_profiles(sensitivity.loc[stochastic], per_seed=True, function="seed_consistency")
    profiles = profiles.loc[profiles["layer"].notna()]
    rows = []
    for key, group in profiles.groupby(PROFILE_KEYS, sort=True):
        by_layer = group.pivot(index="layer", columns="seed", values="mean_delta_nll")
        for seed_a, seed_b in combinations(sorted(by_layer.columns), 2):
            pair = by_layer[[seed_a, seed_b]].dropna()
            rows.append((*key, seed_a, seed_b, *_spearman(pair[seed_a], pair[seed_b]), len(pair)))
    columns = [c for c in SEED_CONSISTENCY_COLUMNS if c not in ("n_layers", "note")] + ["note", "n_layers"]
    out = pd.DataFrame(rows, columns=columns)[SEED_CONSISTENCY_COLUMNS]
    return out.astype({"n_layers": int})


def _spearman(a: pd.Series, b: pd.Series) -> tuple[float, str]:
    """(rho, "") or (nan, why it could not be computed)."""
    if len(a) < 3:
        return float("nan"), f"{len(a)} layers measured in both seeds (a rank correlation needs 3)"
    if a.nunique() < 2 or b.nunique() < 2:
        return float("nan"), "a constant layer profile has no ranking"
    return float(stats.spearmanr(a.to_numpy(), b.to_numpy()).statistic), ""


def critical_layers(
    significance: pd.DataFrame,
    models: pd.DataFrame | Mapping[str, int],
    *,
    top_fraction: float = 0.10,
    flag: str = "significant_bh",
) -> pd.DataFrame:
    """Every measured layer ranked by mean ΔNLL; critical = among the top `top_fraction` AND significant.

    significance: the `significance` relation (mean_delta_nll and the `flag` column, by default the
    headline Benjamini–Hochberg decision). models: the `models` relation or {model: n_layers}; depth =
    layer / n_layers; models with random_weights true are left out (plumbing only, never a finding).
    Per (model, kind, component, strength) and overall (component "all": per layer, the mean over the
    components measured there; significant when any of them is, the correction having run over the sweep).

    A layer may be critical only if its cell is significant after correction with a positive mean ΔNLL, or
    its ΔNLL is non-finite (the loss overflowed: the most sensitive outcome, ranked first). At most
    max(1, floor(top_fraction × measured layers)) are critical, and no minimum is forced: when no layer
    qualifies none is critical and `note` says "none significant" — or "none tested" when no layer of the
    profile could be tested. `significant` is NULL for an untested finite cell. Rank 1 = most sensitive; ties
    go to the shallower layer.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"critical_layers(): top_fraction must be in (0, 1], got {top_fraction}")
    lookup = n_layers_by_model(models, function="critical_layers")
    profiles = _profiles_from(significance, flag)
    if isinstance(models, pd.DataFrame) and "random_weights" in models.columns:
        meta = models.rename(columns={"name": "model"}) if "model" not in models.columns else models
        random_models = set(meta.loc[meta["random_weights"].fillna(False).astype(bool), "model"].astype(str))
        profiles = profiles.loc[~profiles["model"].astype(str).isin(random_models)]
    profiles = profiles.loc[profiles["layer"].notna()]
    overall = nan_propagating_mean(profiles, ["model", "kind", "strength", "layer"], "mean_delta_nll")
    eligible_any = profiles.groupby(["model", "kind", "strength", "layer"], sort=True)["_eligible"].any()
    tested_any = profiles.groupby(["model", "kind", "strength", "layer"], sort=True)["significant"].agg(
        lambda x: x.notna().any()
    )
    overall["_eligible"] = eligible_any.to_numpy()
    overall["significant"] = pd.array(
        np.where(tested_any.to_numpy(), eligible_any.to_numpy(), None), dtype="boolean"
    )
    overall["component"] = OVERALL_COMPONENT
    ranked = pd.concat([profiles, overall], ignore_index=True)
    ranked["_finite"] = np.isfinite(ranked["mean_delta_nll"].astype(float))
    ranked["_eligible"] = ranked["_eligible"].astype(bool) | ~ranked["_finite"]
    ranked = ranked.sort_values(
        [*PROFILE_KEYS, "_finite", "mean_delta_nll", "layer"],
        ascending=[True] * 4 + [True, False, True],  # non-finite (False) first: overflow is most sensitive
        na_position="last",
        kind="mergesort",
    )
    groups = ranked.groupby(PROFILE_KEYS, sort=False)
    ranked["rank"] = groups.cumcount() + 1
    n_measured = groups["layer"].transform("size")
    k = np.maximum(1, np.floor(top_fraction * n_measured + 1e-9)).astype(int)
    # rank among the qualifying layers, so a non-significant layer never takes a critical slot
    qualifying_rank = ranked["_eligible"].astype(int).groupby([ranked[c] for c in PROFILE_KEYS]).cumsum()
    ranked["is_critical"] = ranked["_eligible"] & (qualifying_rank <= k)
    none = ~ranked.groupby(PROFILE_KEYS, sort=False)["_eligible"].transform("any")
    # untested is not "not significant": a profile without any tested layer says so
    tested = ranked["significant"].notna().groupby([ranked[c] for c in PROFILE_KEYS]).transform("any")
    ranked["note"] = np.where(none & tested, NOTE_NONE_SIGNIFICANT, np.where(none, NOTE_NONE_TESTED, ""))
    ranked["layer"] = as_nullable_int(ranked["layer"])
    ranked["depth"] = depth_of(ranked["layer"], ranked["model"], lookup, function="critical_layers")
    ranked = ranked.sort_values([*PROFILE_KEYS, "rank"], kind="mergesort")
    return ranked[CRITICAL_LAYERS_COLUMNS].reset_index(drop=True)


def _profiles_from(source: pd.DataFrame, flag: str) -> pd.DataFrame:
    """Per (model, kind, component, strength, layer): mean_delta_nll, significant (boolean), _eligible."""
    if not isinstance(source, pd.DataFrame) or "mean_delta_nll" not in source.columns:
        raise ValueError(
            "critical_layers(): pass the `significance` relation (columns mean_delta_nll and "
            f"{flag}): critical layers are chosen among cells significant after correction"
        )
    require_columns(
        source,
        [*PROFILE_KEYS, "layer", "mean_delta_nll", flag],
        function="critical_layers",
        relation="significance",
    )
    rows = source.copy()
    rows["layer"] = as_nullable_int(rows["layer"])
    if "expert" in rows.columns:
        rows["expert"] = as_nullable_int(rows["expert"])
    keys = [*PROFILE_KEYS, "layer"] + (["expert"] if "expert" in rows.columns else [])
    check_unique(rows, keys, function="critical_layers", relation="significance")
    rows["mean_delta_nll"] = rows["mean_delta_nll"].astype(float)
    flags = rows[flag].astype("boolean")
    rows["_sig"] = flags.fillna(False).astype(bool) & (rows["mean_delta_nll"] > 0)
    rows["_tested"] = flags.notna()
    means = collapse_experts(rows, [*PROFILE_KEYS, "layer"], "mean_delta_nll")
    # the same rows as collapse_experts: an all-experts row stands for the component where it exists
    if "expert" in rows.columns:
        all_experts = rows["expert"].isna()
        has_all = all_experts.groupby([rows[k] for k in [*PROFILE_KEYS, "layer"]], dropna=False).transform(
            "any"
        )
        rows = rows.loc[all_experts | ~has_all]
    grouped = rows.groupby([*PROFILE_KEYS, "layer"], dropna=False, sort=True)
    sig, tested = grouped["_sig"].any(), grouped["_tested"].any()
    means["_eligible"] = sig.to_numpy()
    means["significant"] = pd.array(np.where(tested.to_numpy(), sig.to_numpy(), None), dtype="boolean")
    return means


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| of two collections taken as sets (e.g. two top-k index sets).

    NaN when both are empty: overlap of nothing with nothing is undefined, not perfect agreement.
    """
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    if not union:
        return math.nan
    return len(set_a & set_b) / len(union)
