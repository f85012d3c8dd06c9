"""Shared pieces of the chart builders: input checks, selection of one perturbation kind, titles.

Every builder takes relations as stored (docs/CONTRACTS.md) and returns an `alt.Chart` (or a layered /
faceted chart). Nothing is plotted silently wrong: an empty frame, a missing column or an ambiguous
selection raises ValueError naming the fix, and charts over random-weight tiny models say so in the title.
"""

from __future__ import annotations

from collections.abc import Iterable

import altair as alt
import pandas as pd

DELTA_NLL_TITLE = "ΔNLL (nats/token)"
PPL_RATIO_TITLE = "PPL ratio (perturbed / baseline)"
DEPTH_TITLE = "relative depth (layer / n_layers)"
PLUMBING_NOTE = "random-weight tiny model — plumbing only"
PLUMBING_COLOR = "#b30000"
EMBEDDING_LABEL = "embedding"

# What `strength` means per perturbation kind (Perturbation.strength in docs/CONTRACTS.md).
STRENGTH_TITLES = {
    "gaussian": "σ (units of rms(W))",
    "router": "σ (units of rms(W))",
    "neurons": "fraction of FFN neurons",
    "scale": "norm gain factor",
    "zero": "fraction of weights",
    "sign_flip": "fraction of weights",
    "bit_flip": "fraction of weights",
}
STRENGTH_SYMBOLS = {"gaussian": "σ", "router": "σ", "neurons": "fraction", "scale": "factor"}


def model_panels(columns: int = 3) -> dict:
    """`.facet(**model_panels())`: one panel per model, wrapped after `columns` so six models stay readable
    (one row of six panels is wider than a page)."""
    return {"facet": alt.Facet("model:N", title=None, header=alt.Header(labelFontWeight="bold")), "columns": columns}


def model_title(model: str, *, plumbing_only: bool, font_size: int = 13) -> alt.TitleParams:
    """Title of one model's panel or row: a random-weight model says so, in the plumbing red."""
    text = f"{model} ({PLUMBING_NOTE})" if plumbing_only else str(model)
    return alt.TitleParams(text, anchor="start", fontSize=font_size, color=PLUMBING_COLOR if plumbing_only else "black")


def pretrained_first(models: Iterable[str], random_models: Iterable[str]) -> list[str]:
    """Model names with the pretrained ones first (they are the finding), each group alphabetical."""
    plumbing = set(random_models)
    return sorted(set(models), key=lambda m: (m in plumbing, str(m)))


def require_rows(df: object, needed: Iterable[str], *, chart: str, relation: str) -> pd.DataFrame:
    """The frame itself, after checking it is a non-empty DataFrame with the relation's columns."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{chart}() expects a pandas DataFrame of the `{relation}` relation, got {type(df).__name__}")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"{chart}() needs the `{relation}` relation's columns {missing} (docs/CONTRACTS.md); "
            f"the frame has {list(df.columns)}"
        )
    if df.empty:
        raise ValueError(f"{chart}(): the `{relation}` frame has no rows; nothing to plot (skip this chart)")
    return df


def finite_mask(values: pd.Series) -> pd.Series:
    """True where the value is a finite number (not NaN, not ±inf, not unparseable)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    return numbers.notna() & numbers.abs().ne(float("inf"))


def drop_nonfinite(df: pd.DataFrame, column: str, *, chart: str, relation: str) -> tuple[pd.DataFrame, int]:
    """Rows with a finite `column`, and how many were dropped; ValueError when none is left."""
    values = pd.to_numeric(df[column], errors="coerce").astype(float)
    finite = finite_mask(values)
    if not finite.any():
        raise ValueError(
            f"{chart}(): every `{relation}`.{column} value is NaN or infinite ({len(df)} rows); nothing to plot "
            "(a perturbation that overflowed the loss, or a statistic undefined at this sample size)"
        )
    out = df.loc[finite].copy()
    out[column] = values[finite]
    return out, int((~finite).sum())


def select_kind(df: pd.DataFrame, kind: str | None, *, chart: str, relation: str) -> tuple[pd.DataFrame, str]:
    """Rows of one perturbation kind: strengths of different kinds are not on one axis.

    kind=None picks the only kind present, or "gaussian" (the main sweep) when several are.
    """
    kinds = sorted(df["kind"].astype(str).unique())
    if kind is None:
        if len(kinds) == 1:
            kind = kinds[0]
        elif "gaussian" in kinds:
            kind = "gaussian"
        else:
            raise ValueError(f"{chart}(): the `{relation}` frame holds kinds {kinds}; pass kind= one of them")
    if kind not in kinds:
        raise ValueError(f"{chart}(): no `{relation}` rows of kind {kind!r}; the frame holds kinds {kinds}")
    return df.loc[df["kind"].astype(str) == kind].copy(), kind


def select_strength(
    df: pd.DataFrame, strength: float | None, *, chart: str, relation: str
) -> tuple[pd.DataFrame, float]:
    """Rows of one strength; None picks the largest (the clearest signal), which the title then names."""
    strengths = sorted(float(s) for s in df["strength"].unique())
    if strength is None:
        strength = strengths[-1]
    matches = (df["strength"].astype(float) - strength).abs() <= 1e-12 * max(1.0, abs(strength))
    if not matches.any():
        raise ValueError(f"{chart}(): no `{relation}` rows at strength {strength}; the frame holds {strengths}")
    return df.loc[matches].copy(), float(strength)


def collapse_expert_cells(
    df: pd.DataFrame, keys: list[str], value: str, flag: str | None = None, all_flag: str | None = None
) -> pd.DataFrame:
    """One row per `keys` cell for MoE relations that hold all-experts rows (expert NULL) and single-expert rows.

    The all-experts row is the component's measurement; a cell measured only per expert shows the mean over
    experts, `flag` true when any expert's flag is and `all_flag` true when every expert's is. Dense relations
    pass through unchanged.
    """
    if "expert" not in df.columns or df["expert"].isna().all():
        return df
    all_experts = df["expert"].isna()
    has_all_row = all_experts.groupby([df[k] for k in keys], dropna=False).transform("any")
    kept = df.loc[all_experts]
    per_expert = df.loc[~has_all_row]
    if per_expert.empty:
        return kept.copy()
    aggregations = {value: "mean", **({flag: "any"} if flag else {}), **({all_flag: "all"} if all_flag else {})}
    averaged = per_expert.groupby(keys, dropna=False, as_index=False).agg(aggregations)
    return pd.concat([kept, averaged], ignore_index=True)


def random_weight_models(df: pd.DataFrame, models: pd.DataFrame | None) -> list[str]:
    """Models in `df` whose weights are random (tiny test models), from the best information available.

    Order of evidence: a `random_weights` column in `df` itself (sensitivity, baselines, zero_shot), the
    `models` relation, and last the registry naming convention (tiny-* models are random-weight, see
    docs/CONTRACTS.md ModelSpec.random_weights) so that a caller who passes neither still gets the label.
    """
    if "model" not in df.columns:
        return []
    names = sorted(str(m) for m in df["model"].unique())
    if "random_weights" in df.columns:
        flagged = df.loc[df["random_weights"].fillna(False).astype(bool), "model"]
        return sorted(str(m) for m in flagged.unique())
    if models is not None:
        meta = models.rename(columns={"name": "model"}) if "model" not in models.columns else models
        if {"model", "random_weights"} <= set(meta.columns):
            known = dict(zip(meta["model"].astype(str), meta["random_weights"].fillna(False).astype(bool), strict=True))
            return [m for m in names if known.get(m, m.startswith("tiny-"))]
    return [m for m in names if m.startswith("tiny-")]


def plumbing_subtitle(random_models: list[str], all_models: Iterable[str]) -> str | None:
    all_models = sorted(set(all_models))
    if not random_models:
        return None
    if set(random_models) >= set(all_models):
        return f"{PLUMBING_NOTE} ({', '.join(random_models)})"
    return f"{PLUMBING_NOTE}: {', '.join(random_models)} (the other models are pretrained)"


def finish(
    chart: alt.TopLevelMixin, *, title: str | list[str], notes: Iterable[str | None] = (),
    random_models: list[str] | None = None, all_models: Iterable[str] = (), warnings: Iterable[str] = (),
) -> alt.VConcatChart:
    """The chart with its title, the random-weight warning (and any other `warnings`) as a red subtitle right
    under it, and the reading notes as a grey caption underneath (Vega gives a title block one colour, hence
    the one-chart concat carrying the caption)."""
    plumbing = plumbing_subtitle(random_models or [], all_models)
    red_lines = [line for line in (plumbing, *warnings) if line]
    titled = chart.properties(
        title=alt.TitleParams(text=title, subtitle=red_lines or alt.Undefined, anchor="start", fontSize=15,
                              subtitleColor=PLUMBING_COLOR, subtitleFontSize=13, subtitleFontWeight="bold")
    )  # fmt: skip
    lines = [line for line in notes if line]
    if not lines:
        return alt.vconcat(titled)
    caption = alt.TitleParams(text=lines, orient="bottom", anchor="start", fontSize=11, fontWeight="normal",
                              color="#444444", offset=12)  # fmt: skip
    return alt.vconcat(titled).properties(title=caption)


def models_text(models: Iterable[str]) -> str:
    names = sorted({str(m) for m in models})
    return names[0] if len(names) == 1 else ", ".join(names)


def strength_text(kind: str, strengths: Iterable[float]) -> str:
    values = sorted({float(s) for s in strengths})
    symbol = STRENGTH_SYMBOLS.get(kind, "strength")
    shown = ", ".join(f"{v:g}" for v in values)
    # plain "=" with a list: the default font has no "∈", and a missing glyph switches the whole line to serif
    return f"{kind} {symbol} = {shown}"


def layer_labels(layers: pd.Series) -> pd.Series:
    """Layer as a label ("0", "1", ... and "embedding" where layer is NULL) for ordinal axes."""
    numeric = pd.to_numeric(layers, errors="coerce")
    return numeric.map(lambda v: EMBEDDING_LABEL if pd.isna(v) else str(int(v)))


def layer_sort_order(labels: pd.Series) -> list[str]:
    numeric = sorted({int(v) for v in labels if v != EMBEDDING_LABEL})
    return ([EMBEDDING_LABEL] if (labels == EMBEDDING_LABEL).any() else []) + [str(v) for v in numeric]
