"""Input checks and reshaping shared by the analysis functions.

Every analysis function takes relations as stored (docs/CONTRACTS.md) and must fail loudly, naming the fix,
when a frame is not what it claims to be: a silently wrong statistic is worse than an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

# Columns that distinguish stored rows but are not part of the analysis keys: when two rows share every key,
# these say why (two datasets, two neuron modes, ...), so the error can name the filter to apply.
_DISAMBIGUATING_COLUMNS = ("dataset", "window_tokens", "mode", "selection", "group_size", "variant")


def require_columns(df: object, needed: Iterable[str], *, function: str, relation: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"{function}() expects a pandas DataFrame of the `{relation}` relation, got {type(df).__name__}"
        )
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"{function}() needs the `{relation}` relation's columns {missing} (see docs/CONTRACTS.md); "
            f"the frame has {list(df.columns)}"
        )


# Up to this many points the Spearman p is exact: every one of the n! pairings (8! = 40,320) is enumerated.
EXACT_SPEARMAN_MAX_N = 8


def spearman_test(x: Iterable[float], y: Iterable[float]) -> tuple[float, float]:
    """(Spearman rho, two-sided p) of two equal-length samples; (nan, nan) when a value is not finite.

    For n <= EXACT_SPEARMAN_MAX_N the p-value is exact: Pearson's r of the (average) ranks under every pairing
    (scipy.stats.pearsonr with PermutationMethod(n_resamples=inf)), conditional on ties. Above that it is
    scipy.stats.spearmanr's Student-t approximation, which is poor for few points: it gives p = 0 whenever
    |rho| = 1, whatever n (exact: 2/n!, e.g. 1/12 for 4 points).
    """
    from scipy import stats

    a, b = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan"), float("nan")
    if len(a) > EXACT_SPEARMAN_MAX_N:
        result = stats.spearmanr(a, b)
        return float(result.statistic), float(result.pvalue)
    exact = stats.pearsonr(stats.rankdata(a), stats.rankdata(b), method=stats.PermutationMethod(n_resamples=np.inf))
    return float(stats.spearmanr(a, b).statistic), float(exact.pvalue)


def as_nullable_int(series: pd.Series) -> pd.Series:
    """layer/expert as pandas Int64 (NULL = not applicable), whatever the reader produced (float NaN, object None)."""
    return pd.to_numeric(series, errors="raise").astype("Int64")


def check_unique(df: pd.DataFrame, keys: list[str], *, function: str, relation: str) -> None:
    duplicated = df.duplicated(keys, keep=False)
    if not duplicated.any():
        return
    rows = df.loc[duplicated]
    differing = [
        c
        for c in _DISAMBIGUATING_COLUMNS
        if c in rows.columns and rows.groupby(keys, dropna=False)[c].nunique(dropna=False).gt(1).any()
    ]
    first = {k: rows.iloc[0][k] for k in keys}
    if differing:
        fix = f"they differ in {differing}: filter the frame to one value of each before calling {function}()"
    else:
        fix = "identical keys stored twice (a partition written twice?): drop the duplicates first"
    raise ValueError(
        f"{function}(): {int(duplicated.sum())} `{relation}` rows share the key {keys} (first: {first}); {fix}"
    )


def nan_propagating_mean(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Group mean that returns NaN when any member is NaN (pandas' mean would silently skip it).

    A NaN ΔNLL means the perturbed model produced NaN losses; averaging it away would hide a broken point.
    """
    grouped = df.assign(_is_nan=df[value].isna()).groupby(keys, dropna=False, sort=True)
    means = grouped[value].mean()
    means = means.where(~grouped["_is_nan"].any())
    return means.reset_index()


def collapse_experts(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """One value per `keys` (which exclude `expert`).

    MoE sweeps may hold rows for all experts at once (expert NULL) and rows for single experts. Where an
    all-experts row exists it is the measurement of the component and single-expert rows are left out;
    where only single-expert rows exist, they are averaged with equal weight per expert.
    """
    if "expert" not in df.columns:
        return nan_propagating_mean(df, keys, value)
    all_experts = df["expert"].isna()
    has_all_experts_row = all_experts.groupby([df[k] for k in keys], dropna=False).transform("any")
    return nan_propagating_mean(df.loc[all_experts | ~has_all_experts_row], keys, value)


def models_frame(models: pd.DataFrame, needed: Iterable[str], *, function: str) -> pd.DataFrame:
    """The `models` relation indexed by model name (`model`, or `name` as in ModelSpec.to_row())."""
    if isinstance(models, pd.DataFrame) and "model" not in models.columns and "name" in models.columns:
        models = models.rename(columns={"name": "model"})
    require_columns(models, ["model", *needed], function=function, relation="models")
    if models["model"].duplicated().any():
        dup = sorted(models.loc[models["model"].duplicated(), "model"].unique())
        raise ValueError(
            f"{function}(): the `models` frame lists {dup} more than once; keep one row per model"
        )
    return models.set_index("model")


def require_known_models(models_needed: Iterable[str], known: Iterable[str], *, function: str) -> None:
    missing = sorted(set(models_needed) - set(known))
    if missing:
        raise ValueError(
            f"{function}(): no `models` row for {missing}; pass the `models` relation covering every model "
            "in the sensitivity frame"
        )


def n_layers_by_model(n_layers: pd.DataFrame | Mapping[str, int], *, function: str) -> dict[str, int]:
    if isinstance(n_layers, pd.DataFrame):
        frame = models_frame(n_layers, ["n_layers"], function=function)
        lookup = {str(m): int(n) for m, n in frame["n_layers"].items()}
    elif isinstance(n_layers, Mapping):
        lookup = {str(m): int(n) for m, n in n_layers.items()}
    else:
        raise TypeError(
            f"{function}(): n_layers must be the `models` relation (columns model, n_layers) or a "
            f"{{model: n_layers}} dict, got {type(n_layers).__name__}"
        )
    bad = {m: n for m, n in lookup.items() if n < 1}
    if bad:
        raise ValueError(f"{function}(): n_layers must be >= 1, got {bad}")
    return lookup


def depth_of(
    layers: pd.Series, models: pd.Series, n_layers: Mapping[str, int], *, function: str
) -> pd.Series:
    """Normalised depth layer / n_layers (NaN where layer is NULL, e.g. the embedding)."""
    require_known_models(models.unique(), n_layers, function=function)
    total = models.map(n_layers).astype(float)
    layer = layers.astype("Float64").astype(float)
    out_of_range = (layer < 0) | (layer >= total)
    if out_of_range.any():
        i = out_of_range.idxmax()
        raise ValueError(
            f"{function}(): layer {int(layer[i])} of model {models[i]!r} is outside 0..{int(total[i]) - 1}; "
            "the n_layers given does not match the sweep (wrong model row?)"
        )
    return pd.Series(np.asarray(layer / total, dtype=float), index=layers.index)
