"""Views of the analysis relations: critical layers, cross-seed consistency, architecture comparison on
normalised depth, MoE routing change, and the scaling-law fit.

    critical_layers_chart(critical_layers)          ΔNLL per relative depth, critical (top-10%) layers highlighted
    seed_consistency_chart(seed_consistency)        Spearman ρ of layer profiles per seed pair
    architecture_chart(architecture_comparison)     one line per model on relative depth, panel per component
    moe_routing_chart(moe_routing)                  expert-selection change rate per layer
    scaling_chart(scaling_fit, sensitivity, models) params vs ΔNLL (log-log), fitted line, exponent band
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from esa_pipeline.core.analysis.consistency import layer_profiles
from esa_pipeline.core.reporting.charts._common import (
    DELTA_NLL_TITLE,
    DEPTH_TITLE,
    STRENGTH_TITLES,
    drop_nonfinite,
    finish,
    model_panels,
    models_text,
    random_weight_models,
    require_rows,
    select_kind,
    select_strength,
    strength_text,
)

CRITICAL_NEEDED = ["model", "kind", "component", "strength", "layer", "depth", "mean_delta_nll", "rank", "is_critical"]
CONSISTENCY_NEEDED = ["model", "kind", "component", "strength", "seed_a", "seed_b", "spearman_rho", "n_layers"]
ARCHITECTURE_NEEDED = ["model", "is_moe", "kind", "component", "strength", "layer", "depth", "mean_delta_nll"]
ROUTING_NEEDED = ["model", "layer", "strength", "seed", "expert_change_rate"]
SCALING_NEEDED = ["kind", "component", "strength", "param_basis", "n_models", "exponent", "exponent_ci_low",
                  "exponent_ci_high", "intercept", "r2", "r2_required_p05", "warnings"]  # fmt: skip
PARAM_COLUMNS = {"total": "params_total", "active": "params_active"}
# log-axis tick labels: powers of ten only, as 1M / 10M / 1B (the minor ticks 2..9 × 10^k stay unlabelled)
PARAMS_LABEL = (
    "abs(datum.value / pow(10, floor(log(datum.value) / LN10 + 1e-9)) - 1) > 1e-6 ? '' : "
    "datum.value >= 1e9 ? format(datum.value / 1e9, '~g') + 'B' : "
    "datum.value >= 1e6 ? format(datum.value / 1e6, '~g') + 'M' : format(datum.value, '~s')"
)


def critical_layers_chart(
    critical_layers: pd.DataFrame,
    *,
    kind: str | None = None,
    component: str = "all",
    strength: float | None = None,
    models: pd.DataFrame | None = None,
) -> alt.VConcatChart:
    """Bars of mean ΔNLL per layer (x = relative depth), critical layers in red; one panel per model.

    component="all" is the overall profile (mean over components) that critical_layers() stores.
    """
    chart = "critical_layers_chart"
    df = require_rows(critical_layers, CRITICAL_NEEDED, chart=chart, relation="critical_layers")
    df, kind = select_kind(df, kind, chart=chart, relation="critical_layers")
    components = sorted(df["component"].astype(str).unique())
    if component not in components:
        raise ValueError(f"{chart}(): no critical_layers rows for component {component!r}; the frame has {components}")
    df = df.loc[df["component"] == component]
    df, strength = select_strength(df, strength, chart=chart, relation="critical_layers")
    df, n_dropped = drop_nonfinite(df, "mean_delta_nll", chart=chart, relation="critical_layers")
    df["status"] = np.where(df["is_critical"].astype(bool), "critical (significant, top 10%)", "other")
    df["layer"] = df["layer"].astype(int)
    bars = (
        alt.Chart()
        .mark_bar(size=10)
        .encode(
            x=alt.X("depth:Q", title=DEPTH_TITLE, scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("mean_delta_nll:Q", title=DELTA_NLL_TITLE),
            color=alt.Color("status:N", title="layer", scale=alt.Scale(domain=["critical (significant, top 10%)", "other"],
                                                                     range=["#d62728", "#9ecae1"])),
            tooltip=["model", "layer", alt.Tooltip("depth:Q", format=".2f"),
                     alt.Tooltip("mean_delta_nll:Q", format=".4g"), "rank", "is_critical"],
        )
    )  # fmt: skip
    labels = (
        alt.Chart()
        .mark_text(dy=-6, fontSize=10)
        .encode(x="depth:Q", y="mean_delta_nll:Q", text="layer:N")
        .transform_filter(alt.datum.is_critical)
    )
    data = df[["model", "layer", "depth", "mean_delta_nll", "rank", "is_critical", "status"]]
    faceted = (
        alt.layer(bars, labels, data=data)
        .properties(width=300, height=180)
        .facet(**model_panels())
        .resolve_scale(y="independent")
    )
    notes = [
        "red bars: layers significant after BH correction (or overflowed) within the top 10% by seed-averaged ΔNLL "
        "(labelled with the layer index); none red = none significant, or none tested (see the critical_layers note)",
        f"{n_dropped} layer(s) with non-finite ΔNLL not shown" if n_dropped else None,
    ]
    return finish(
        faceted, title=f"Critical layers — {models_text(df['model'])}, component {component}, {strength_text(kind, [strength])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def seed_consistency_chart(
    seed_consistency: pd.DataFrame, *, kind: str | None = None, models: pd.DataFrame | None = None
) -> alt.VConcatChart:
    """Spearman ρ between the layer profiles of seed pairs (x, -1..1), per component (y), strength (colour);
    one panel per model. ρ near 1: the layer ranking does not depend on the noise draw."""
    chart = "seed_consistency_chart"
    df = require_rows(seed_consistency, CONSISTENCY_NEEDED, chart=chart, relation="seed_consistency")
    df, kind = select_kind(df, kind, chart=chart, relation="seed_consistency")
    df, n_dropped = drop_nonfinite(df, "spearman_rho", chart=chart, relation="seed_consistency")
    df["seed_pair"] = df["seed_a"].astype(str) + " vs " + df["seed_b"].astype(str)
    points = (
        alt.Chart()
        .mark_point(filled=True, size=60, opacity=0.8)
        .encode(
            x=alt.X("spearman_rho:Q", title="Spearman ρ between seeds' layer profiles (unitless)",
                    scale=alt.Scale(domain=[-1, 1])),
            y=alt.Y("component:N", title="component"),
            color=alt.Color("strength:O", title=STRENGTH_TITLES.get(kind, "strength"),
                            scale=alt.Scale(scheme="viridis")),
            tooltip=["model", "component", "strength", "seed_pair", alt.Tooltip("spearman_rho:Q", format=".3f"),
                     "n_layers"],
        )
    )  # fmt: skip
    rule = alt.Chart().mark_rule(color="#888888", strokeDash=[3, 3]).encode(x=alt.datum(0))
    data = df[["model", "component", "strength", "seed_pair", "spearman_rho", "n_layers"]]
    faceted = (
        alt.layer(rule, points, data=data)
        .properties(width=260, height=alt.Step(22))
        .facet(**model_panels())
        .resolve_scale(y="independent")  # each model lists only the components it has
    )
    pairs = df["seed_pair"].nunique()
    notes = [
        f"one dot per seed pair ({pairs} pair(s)) and strength; layer profiles need ≥ 3 layers for ρ",
        f"{n_dropped} pair(s) with undefined ρ (< 3 common layers or a constant profile) not shown"
        if n_dropped else None,
    ]  # fmt: skip
    return finish(
        faceted, title=f"Cross-seed consistency of layer profiles — {models_text(df['model'])}, "
            f"{strength_text(kind, df['strength'].unique())}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def architecture_chart(
    comparison: pd.DataFrame,
    *,
    kind: str | None = None,
    strength: float | None = None,
    models: pd.DataFrame | None = None,
) -> alt.VConcatChart:
    """Seed-averaged ΔNLL against relative depth, one line per model (dashed = MoE), one panel per component."""
    chart = "architecture_chart"
    df = require_rows(comparison, ARCHITECTURE_NEEDED, chart=chart, relation="architecture_comparison")
    df, kind = select_kind(df, kind, chart=chart, relation="architecture_comparison")
    df, strength = select_strength(df, strength, chart=chart, relation="architecture_comparison")
    df = df.loc[df["depth"].notna()]  # the embedding has no depth
    if df.empty:
        raise ValueError(f"{chart}(): only embedding rows (no layer, no depth) at this strength; nothing to plot")
    df, n_dropped = drop_nonfinite(df, "mean_delta_nll", chart=chart, relation="architecture_comparison")
    df["architecture"] = np.where(df["is_moe"].astype(bool), "MoE", "dense")
    data = df[["model", "architecture", "component", "layer", "depth", "mean_delta_nll"]]
    x = alt.X("depth:Q", title=DEPTH_TITLE, scale=alt.Scale(domain=[0, 1]))
    y = alt.Y("mean_delta_nll:Q", title=DELTA_NLL_TITLE)
    color = alt.Color("model:N", title="model")
    # lines and dots as separate layers: with mark_line(point=True) the dash legend shows blank dot symbols
    line = alt.Chart().mark_line().encode(
        x=x, y=y, color=color, detail="model:N",
        strokeDash=alt.StrokeDash("architecture:N", title="architecture",
                                  scale=alt.Scale(domain=["dense", "MoE"], range=[[1, 0], [5, 3]]),
                                  legend=alt.Legend(symbolType="stroke", symbolStrokeColor="#333333")),
    )  # fmt: skip
    dots = alt.Chart().mark_point(filled=True, size=30).encode(
        x=x, y=y, color=color,
        tooltip=["model", "architecture", "component", "layer", alt.Tooltip("depth:Q", format=".2f"),
                 alt.Tooltip("mean_delta_nll:Q", format=".4g")],
    )  # fmt: skip
    lines = alt.layer(line, dots, data=data).properties(width=220, height=160)
    faceted = lines.facet(
        facet=alt.Facet("component:N", title=None, header=alt.Header(labelFontWeight="bold")), columns=3
    ).resolve_scale(y="independent")
    notes = [
        "layers placed at layer / n_layers so models of different depth line up; dashed lines = MoE models",
        f"{n_dropped} point(s) with non-finite ΔNLL not shown" if n_dropped else None,
    ]
    return finish(
        faceted, title=f"Architecture comparison on relative depth — {strength_text(kind, [strength])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def moe_routing_chart(moe_routing: pd.DataFrame, *, models: pd.DataFrame | None = None) -> alt.VConcatChart:
    """Fraction of tokens whose top-k expert set changed under router noise, per layer; line = seed mean,
    dots = seeds, colour = strength, one panel per MoE model."""
    chart = "moe_routing_chart"
    df = require_rows(moe_routing, ROUTING_NEEDED, chart=chart, relation="moe_routing")
    df, n_dropped = drop_nonfinite(df, "expert_change_rate", chart=chart, relation="moe_routing")
    df["layer"] = df["layer"].astype(int)
    mean = df.groupby(["model", "layer", "strength"], as_index=False)["expert_change_rate"].mean()
    both = pd.concat(
        [df[["model", "layer", "strength", "seed", "expert_change_rate"]].assign(role="seed"), mean.assign(role="mean")],
        ignore_index=True,
    )
    x = alt.X("layer:O", title="layer (0 = first decoder layer)", axis=alt.Axis(labelAngle=0))
    y = alt.Y("expert_change_rate:Q", title="tokens with changed expert set (fraction)", scale=alt.Scale(domain=[0, 1]))
    color = alt.Color("strength:O", title=STRENGTH_TITLES["router"], scale=alt.Scale(scheme="viridis"))
    lines = alt.Chart().mark_line().encode(x=x, y=y, color=color).transform_filter(alt.datum.role == "mean")
    dots = (
        alt.Chart()
        .mark_point(size=30)
        .encode(x=x, y=y, color=color, tooltip=["model", "layer", "strength", "seed",
                                                alt.Tooltip("expert_change_rate:Q", format=".3f")])
        .transform_filter(alt.datum.role == "seed")
    )  # fmt: skip
    faceted = (
        alt.layer(lines, dots, data=both)
        .properties(width=300, height=180)
        .facet(**model_panels())
    )
    notes = [f"line: mean over seeds {sorted(int(s) for s in df['seed'].unique())}; dots: single seeds",
             f"{n_dropped} row(s) with non-finite change rate not shown" if n_dropped else None]  # fmt: skip
    return finish(
        faceted, title=f"MoE routing change under router noise — {models_text(df['model'])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def scaling_chart(
    scaling_fit: pd.DataFrame,
    sensitivity: pd.DataFrame,
    models: pd.DataFrame,
    *,
    kind: str | None = None,
    component: str,
    strength: float | None = None,
    param_basis: str = "total",
    family: str | None = None,
) -> alt.VConcatChart:
    """Parameters (x, log) vs mean ΔNLL (y, log) per model, the stored OLS line and its exponent band.

    One family's fit (`family`; by default the family with a fit and the most models). The points are the
    pretrained models of that family, recomputed the way scaling_fit() computes them (seed- then
    layer-averaged ΔNLL), so they are the data the line was fitted to; random-weight models are never drawn. The band shows the exponent's CI only (the intercept's uncertainty is
    not stored), pivoted at the data centroid in log space, where every OLS line passes.
    """
    chart = "scaling_chart"
    if param_basis not in PARAM_COLUMNS:
        raise ValueError(f"{chart}(): param_basis must be one of {sorted(PARAM_COLUMNS)}, got {param_basis!r}")
    fits = require_rows(scaling_fit, SCALING_NEEDED, chart=chart, relation="scaling_fit")
    fits, kind = select_kind(fits, kind, chart=chart, relation="scaling_fit")
    fits = fits.loc[(fits["component"] == component) & (fits["param_basis"] == param_basis)]
    if fits.empty:
        raise ValueError(f"{chart}(): no scaling_fit row for component {component!r}, basis {param_basis!r}")
    fits, strength = select_strength(fits, strength, chart=chart, relation="scaling_fit")
    if "family" in fits.columns:
        if family is not None:
            fits = fits.loc[fits["family"] == family]
            if fits.empty:
                raise ValueError(f"{chart}(): no scaling_fit row for family {family!r} in this cell")
        fits = fits.assign(_fitted=fits["exponent"].notna()).sort_values(["_fitted", "n_models"], ascending=False)
    fit = fits.iloc[0]

    meta = models.rename(columns={"name": "model"}) if "model" not in models.columns else models
    require_rows(meta, ["model", PARAM_COLUMNS[param_basis]], chart=chart, relation="models")
    profiles = layer_profiles(require_rows(sensitivity, ["kind"], chart=chart, relation="sensitivity"),
                              function=chart)  # fmt: skip
    cell = profiles.loc[(profiles["kind"] == kind) & (profiles["component"] == component)
                        & ((profiles["strength"].astype(float) - strength).abs() <= 1e-12)]  # fmt: skip
    points = cell.groupby("model", as_index=False)["mean_delta_nll"].mean()
    if "family" in fits.columns and pd.notna(fit["family"]) and "family" in meta.columns:
        pretrained = ~meta["random_weights"].fillna(False).astype(bool) if "random_weights" in meta.columns else True
        in_family = set(meta.loc[(meta["family"] == fit["family"]) & pretrained, "model"].astype(str))
        points = points.loc[points["model"].astype(str).isin(in_family)]
    points = points.merge(meta[["model", PARAM_COLUMNS[param_basis]]], on="model", how="left")
    points = points.rename(columns={PARAM_COLUMNS[param_basis]: "params"})
    if points["params"].isna().any():
        missing = sorted(points.loc[points["params"].isna(), "model"])
        raise ValueError(f"{chart}(): no `models` row (parameter count) for {missing}; pass the full models relation")
    usable = points.loc[np.isfinite(points["mean_delta_nll"]) & (points["mean_delta_nll"] > 0)].copy()
    if usable.empty:
        raise ValueError(f"{chart}(): no model with a positive finite mean ΔNLL for this cell; nothing on log axes")

    x = alt.X("params:Q", title=f"parameters ({param_basis}, count)", scale=alt.Scale(type="log"),
              axis=alt.Axis(labelExpr=PARAMS_LABEL, grid=True))
    y = alt.Y("mean_delta_nll:Q", title=f"mean {DELTA_NLL_TITLE}", scale=alt.Scale(type="log"))
    layers = [
        alt.Chart(usable).mark_point(filled=True, size=90, color="#1f77b4").encode(
            x=x, y=y, tooltip=["model", alt.Tooltip("params:Q", format=".3s"),
                               alt.Tooltip("mean_delta_nll:Q", format=".4g")]),
        alt.Chart(usable).mark_text(dx=8, align="left", fontSize=11).encode(x=x, y=y, text="model:N"),
    ]  # fmt: skip
    has_fit = np.isfinite(float(fit["exponent"]))
    if has_fit:
        line, band = _fit_curves(usable, fit)
        layers.insert(0, alt.Chart(band).mark_area(opacity=0.2, color="#ff7f0e").encode(
            x=x, y=alt.Y("low:Q", scale=alt.Scale(type="log")), y2="high:Q"))  # fmt: skip
        layers.insert(1, alt.Chart(line).mark_line(color="#ff7f0e").encode(x=x, y=alt.Y("fitted:Q", scale=alt.Scale(type="log"))))
        headline = (
            f"exponent {fit['exponent']:.3g} (95% CI {fit['exponent_ci_low']:.3g} … {fit['exponent_ci_high']:.3g}), "
            f"R² = {fit['r2']:.3f} (p < 0.05 needs R² ≥ {fit['r2_required_p05']:.3f} at n = {int(fit['n_models'])})"
        )
        band_note = "orange line: fitted ΔNLL = e^intercept · params^exponent; band: exponent CI only, pivoted at the data centroid"
    else:
        headline = f"no fit drawn (not enough models): {int(fit['n_models'])} usable pretrained model(s)"
        band_note = None
    warnings = [f"warning: {w.strip()}" for w in str(fit["warnings"] or "").split(";") if w.strip()]
    return finish(
        alt.layer(*layers).properties(width=420, height=300),
        title=[f"Scaling of sensitivity with size — {component}, {strength_text(kind, [strength])}"
               + (f", family {fit['family']}" if "family" in fit.index and pd.notna(fit["family"]) else ""), headline],
        notes=[band_note], warnings=warnings,
        random_models=random_weight_models(usable, meta), all_models=usable["model"],
    )  # fmt: skip


def _fit_curves(points: pd.DataFrame, fit: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    log_x = np.log(points["params"].astype(float).to_numpy())
    grid = np.linspace(log_x.min(), log_x.max(), 50) if np.ptp(log_x) > 0 else np.array([log_x[0]])
    fitted = fit["intercept"] + fit["exponent"] * grid
    centre_x = log_x.mean()
    centre_y = fit["intercept"] + fit["exponent"] * centre_x
    a = centre_y + fit["exponent_ci_low"] * (grid - centre_x)
    b = centre_y + fit["exponent_ci_high"] * (grid - centre_x)
    line = pd.DataFrame({"params": np.exp(grid), "fitted": np.exp(fitted)})
    band = pd.DataFrame({"params": np.exp(grid), "low": np.exp(np.minimum(a, b)), "high": np.exp(np.maximum(a, b))})
    return line, band
