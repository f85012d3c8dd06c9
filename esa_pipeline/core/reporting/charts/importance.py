"""Weight-importance views: score distributions, the causal top-k / random-k / bottom-k check, and the
second-order prediction of ΔNLL against the measurement.

    importance_distribution_chart(weight_importance)       histogram of log10(score) per metric and model
    importance_validation_chart(importance_validation)     ΔNLL of perturbing top-k vs random-k vs bottom-k
    prediction_chart(prediction_check)                     predicted vs measured ΔNLL with the y = x line
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from esa_pipeline.core.reporting.charts._common import (
    DELTA_NLL_TITLE,
    drop_nonfinite,
    finish,
    finite_mask,
    model_title,
    models_text,
    pretrained_first,
    random_weight_models,
    require_rows,
    select_kind,
)

IMPORTANCE_NEEDED = ["model", "metric", "scope", "component", "layer", "score", "rank", "k"]
VALIDATION_NEEDED = ["model", "metric", "kind", "selection", "component", "strength", "seed", "k", "delta_nll"]
PREDICTION_NEEDED = ["model", "component", "layer", "strength", "predicted_delta_nll", "measured_delta_nll"]
SELECTION_ORDER = ["top", "random", "bottom"]
SELECTION_COLORS = ["#d62728", "#7f7f7f", "#2ca02c"]


def importance_distribution_chart(
    weight_importance: pd.DataFrame, *, scope: str | None = None, models: pd.DataFrame | None = None
) -> alt.VConcatChart:
    """Histogram of log10(score) of the stored (top-k) weights, one panel per metric (independent x: the
    metrics have unrelated units), colour per model. Zero scores have no logarithm and are counted in the
    subtitle instead."""
    chart = "importance_distribution_chart"
    df = require_rows(weight_importance, IMPORTANCE_NEEDED, chart=chart, relation="weight_importance")
    scopes = sorted(df["scope"].astype(str).unique())
    if scope is None:
        scope = "global" if "global" in scopes else scopes[0]
    if scope not in scopes:
        raise ValueError(f"{chart}(): no weight_importance rows of scope {scope!r}; the frame has {scopes}")
    df = df.loc[df["scope"] == scope]
    df, n_nonfinite = drop_nonfinite(df, "score", chart=chart, relation="weight_importance")
    positive = df["score"] > 0
    n_zero = int((~positive).sum())
    df = df.loc[positive].copy()
    if df.empty:
        raise ValueError(f"{chart}(): every finite score is <= 0; no log-scale distribution to show")
    df["log10_score"] = np.log10(df["score"])
    # one chart per metric, not a facet: a facet bins over the pooled extent of all metrics, whose scores
    # live on unrelated scales (|W| ~ 1e-1, Hutchinson ~ 1e-6), squeezing each histogram into a few bins
    panels = [
        alt.Chart(group[["model", "metric", "log10_score"]], title=alt.TitleParams(str(metric), fontSize=12))
        .mark_bar(opacity=0.85, binSpacing=0)
        .encode(
            x=alt.X("log10_score:Q", bin=alt.Bin(maxbins=25), title="log10(importance score) (metric's own units)",
                    axis=alt.Axis(labelOverlap=True, format="~g")),
            # stacked: overlaid bars hid every model but the last drawn where scores coincide (norm gains = 1)
            y=alt.Y("count():Q", title="weights (count, stacked by model)", stack="zero"),
            color=alt.Color("model:N", title="model"),
            tooltip=["model", "metric", alt.Tooltip("count():Q", title="weights")],
        )
        .properties(width=220, height=160)
        for metric, group in df.groupby("metric", sort=True)
    ]  # fmt: skip
    faceted = alt.hconcat(*panels)
    k_values = sorted(int(k) for k in df["k"].dropna().unique())
    notes = [
        f"scope {scope}: the k = {', '.join(map(str, k_values))} highest-scoring weights stored per metric",
        f"{n_zero} zero score(s) and {n_nonfinite} non-finite score(s) not shown" if n_zero or n_nonfinite else None,
    ]
    return finish(
        faceted, title=f"Weight-importance score distributions — {models_text(df['model'])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def importance_validation_chart(
    importance_validation: pd.DataFrame, *, kind: str | None = None, models: pd.DataFrame | None = None
) -> alt.VConcatChart:
    """Mean ΔNLL (bar) and per-seed values (dots) of perturbing the top-k, a random k and the bottom-k
    weights, per k (x), one panel per (model, metric). An importance metric is causally meaningful when
    top ≫ random ≫ bottom."""
    chart = "importance_validation_chart"
    df = require_rows(importance_validation, VALIDATION_NEEDED, chart=chart, relation="importance_validation")
    if "kind" not in df.columns or df["kind"].isna().all():
        kind = kind or "zero"
    else:
        df, kind = select_kind(df, kind, chart=chart, relation="importance_validation")
    unknown = sorted(set(df["selection"].astype(str)) - set(SELECTION_ORDER))
    if unknown:
        raise ValueError(f"{chart}(): selection values {unknown} are not one of {SELECTION_ORDER}")
    # one x group per validated (component, layer): k differs with the slice size, so k alone is ambiguous
    where = df["component"].astype(str)
    if "layer" in df.columns:
        where = where + pd.to_numeric(df["layer"], errors="coerce").map(lambda v: "" if pd.isna(v) else f" L{int(v)}")
    df = df.assign(k_label=where + " · k = " + df["k"].map(lambda k: f"{int(k):,}"))
    keys = ["model", "metric", "component", "k", "k_label", "selection"]
    # a perturbation that overflowed the loss (bit_flip on the top weights) is the largest effect of all:
    # it must show as a marker, not as a missing bar that leaves the smaller ones looking like the worst
    overflowed = df.loc[~finite_mask(df["delta_nll"])].groupby(keys, as_index=False).size().rename(columns={"size": "nonfinite_seeds"})
    df, n_dropped = drop_nonfinite(df, "delta_nll", chart=chart, relation="importance_validation")
    per_seed = df.groupby([*keys, "seed"], as_index=False)["delta_nll"].mean()
    mean = per_seed.groupby(keys, as_index=False)["delta_nll"].mean()
    both = pd.concat([per_seed.assign(role="seed"), mean.assign(role="mean"),
                      overflowed.assign(role="nonfinite", delta_nll=np.nan)], ignore_index=True)  # fmt: skip
    k_order = df.sort_values(["component", "k"])["k_label"].drop_duplicates().tolist()
    x = alt.X("k_label:N", title="slice · weights perturbed (k)", sort=k_order, axis=alt.Axis(labelAngle=-30))
    color = alt.Color("selection:N", title="weights chosen", sort=SELECTION_ORDER,
                      scale=alt.Scale(domain=SELECTION_ORDER, range=SELECTION_COLORS))  # fmt: skip
    offset = alt.XOffset("selection:N", sort=SELECTION_ORDER)
    y = alt.Y("delta_nll:Q", title=DELTA_NLL_TITLE)
    bars = (
        alt.Chart()
        .mark_bar(opacity=0.85)
        .encode(x=x, xOffset=offset, y=y, color=color,
                tooltip=["model", "metric", "k", "selection", alt.Tooltip("delta_nll:Q", format=".4g")])
        .transform_filter(alt.datum.role == "mean")
    )  # fmt: skip
    dots = (
        alt.Chart()
        .mark_point(color="black", size=18, filled=True)
        .encode(x=x, xOffset=offset, y=y)
        .transform_filter(alt.datum.role == "seed")
    )
    infinite = (
        alt.Chart()
        .mark_text(text="∞", fontSize=18, fontWeight="bold", baseline="top")
        .encode(x=x, xOffset=offset, y=alt.value(2), color=color,
                tooltip=["model", "metric", "k", "selection", alt.Tooltip("nonfinite_seeds:Q", title="seeds inf/NaN")])
        .transform_filter(alt.datum.role == "nonfinite")
    )  # fmt: skip
    random_models = random_weight_models(df, models)
    # one row per model over only the metrics it has (fused MoE experts get no activation score): a shared
    # facet grid would leave that cell as an empty panel
    rows = []
    for model in pretrained_first(both["model"], random_models):
        rows.append(
            alt.layer(bars, dots, infinite, data=both.loc[both["model"] == model])
            .properties(width=alt.Step(16), height=170)
            .facet(column=alt.Column("metric:N", title=None, header=alt.Header(labelFontWeight="bold")))
            .resolve_scale(x="independent", y="independent")
            .properties(title=model_title(model, plumbing_only=model in random_models))
        )  # fmt: skip
    faceted = alt.vconcat(*rows, spacing=24).resolve_scale(x="independent", y="independent")
    strengths = ", ".join(f"{s:g}" for s in sorted(df["strength"].astype(float).unique()))
    notes = [
        f"{kind} on the chosen weights (strength {strengths}); bars: seed mean, dots: single seeds",
        f"∞: {n_dropped} row(s) whose ΔNLL was inf/NaN (the loss overflowed); a bar beside ∞ is the mean of the "
        "finite seeds only" if n_dropped else None,
    ]
    return finish(
        faceted, title=f"Causal check of importance: top-k vs random-k vs bottom-k — {models_text(df['model'])}",
        notes=notes, random_models=random_models, all_models=df["model"].unique(),
    )  # fmt: skip


def prediction_chart(prediction_check: pd.DataFrame, *, models: pd.DataFrame | None = None) -> alt.VConcatChart:
    """Predicted (½σ²·Σ rms²·diag F) vs measured ΔNLL, one panel per model (its own axes and y = x line),
    colour = component, shape = σ.

    A panel gets log axes when all its values are positive (the prediction spans orders of magnitude across
    σ); a measured ΔNLL ≤ 0 (noise that happened to help) cannot go on a log axis, so then it is linear.
    Panels are separate because a random-weight model's curvature is orders of magnitude below a pretrained
    model's: on shared axes one of them collapses onto a line.
    """
    chart = "prediction_chart"
    df = require_rows(prediction_check, PREDICTION_NEEDED, chart=chart, relation="prediction_check")
    df, n_pred = drop_nonfinite(df, "predicted_delta_nll", chart=chart, relation="prediction_check")
    df, n_meas = drop_nonfinite(df, "measured_delta_nll", chart=chart, relation="prediction_check")
    n_floor = 0
    if "below_noise_floor" in df.columns:  # indistinguishable from evaluation noise: not a measurement
        below = df["below_noise_floor"].fillna(True).astype(bool)
        n_floor = int(below.sum())
        df = df.loc[~below]
        if df.empty:
            raise ValueError(f"{chart}(): every prediction_check row is below its noise floor: nothing measured")
    random_models = random_weight_models(df, models)
    # pretrained models first: they are the finding, the random-weight panels only check the plumbing
    panels = [_prediction_panel(df.loc[df["model"] == m], str(m), plumbing_only=m in random_models)
              for m in pretrained_first(df["model"], random_models)]  # fmt: skip
    dropped = n_pred + n_meas
    antithetic = "antithetic" in df.columns and df["antithetic"].fillna(False).astype(bool).all()
    notes = [
        "dashed: y = x (prediction exact); above it the quadratic approximation underestimates the damage",
        "measured: seed mean of antithetic ±δ pairs (the first-order term cancels)" if antithetic
        else "measured: seed mean of single draws (the first-order term adds noise at small σ)",
        "log axes where every value of a panel is positive, linear otherwise; axes per model",
        f"{dropped} point(s) with non-finite values not shown" if dropped else None,
        f"{n_floor} point(s) below the evaluation noise floor not shown (no ratio is formed from them)"
        if n_floor else None,
    ]  # fmt: skip
    grid = alt.concat(*panels, columns=3).resolve_scale(x="independent", y="independent")
    return finish(
        grid, title=f"Second-order prediction vs measured ΔNLL — {models_text(df['model'])}",
        notes=notes, random_models=random_models, all_models=df["model"].unique(),
    )  # fmt: skip


def _prediction_panel(df: pd.DataFrame, model: str, *, plumbing_only: bool) -> alt.LayerChart:
    values = pd.concat([df["predicted_delta_nll"], df["measured_delta_nll"]])
    log_axes = bool((values > 0).all())
    scale = alt.Scale(type="log") if log_axes else alt.Scale(type="linear", zero=False)
    low, high = float(values.min()), float(values.max())
    diagonal = pd.DataFrame({"predicted_delta_nll": [low, high], "measured_delta_nll": [low, high]})
    data = df[["model", "component", "layer", "strength", "predicted_delta_nll", "measured_delta_nll"]]
    axis = alt.Axis(format="~g")  # 2e-7, not 0.0000002
    x = alt.X("predicted_delta_nll:Q", title=f"predicted {DELTA_NLL_TITLE}", scale=scale, axis=axis)
    y = alt.Y("measured_delta_nll:Q", title=f"measured {DELTA_NLL_TITLE}", scale=scale, axis=axis)
    identity = alt.Chart(diagonal).mark_line(color="#888888", strokeDash=[4, 4]).encode(x=x, y=y)
    points = alt.Chart(data).mark_point(filled=True, size=50, opacity=0.8).encode(
        x=x, y=y, color=alt.Color("component:N", title="component"), shape=alt.Shape("strength:O", title="σ"),
        tooltip=["model", "component", "layer", "strength", alt.Tooltip("predicted_delta_nll:Q", format=".4g"),
                 alt.Tooltip("measured_delta_nll:Q", format=".4g")],
    )  # fmt: skip
    return alt.layer(identity, points).properties(
        width=300, height=240, title=model_title(model, plumbing_only=plumbing_only, font_size=12)
    )
