"""Sensitivity views: layer × component heatmap, degradation curves, and per-layer profiles.

    sensitivity_heatmap(significance)   mean ΔNLL per layer × component, faceted model × strength,
                                        BH-significant cells marked
    degradation_curves(frame)           strength → ΔNLL (or PPL ratio) per component with an uncertainty band,
                                        one panel per model, log x-axis
    layer_profile_chart(sensitivity)    ΔNLL per layer, one line per strength (a sensitivity partition's view)
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from esa_pipeline.core.reporting.charts._common import (
    DELTA_NLL_TITLE,
    PPL_RATIO_TITLE,
    STRENGTH_SYMBOLS,
    STRENGTH_TITLES,
    collapse_expert_cells,
    drop_nonfinite,
    finish,
    layer_labels,
    layer_sort_order,
    model_panels,
    model_title,
    models_text,
    random_weight_models,
    require_rows,
    select_kind,
    strength_text,
)

SIGNIFICANCE_NEEDED = ["model", "kind", "component", "layer", "strength", "mean_delta_nll"]
SENSITIVITY_NEEDED = ["model", "kind", "component", "layer", "strength", "seed", "delta_nll"]
SIGNIFICANT_LABEL = "BH-significant (q < 0.05)"
UNTESTED_LABEL = "not testable (reason in the significance table)"


def sensitivity_heatmap(
    significance: pd.DataFrame,
    *,
    kind: str | None = None,
    models: pd.DataFrame | None = None,
    marker: str = "significant_bh",
) -> alt.VConcatChart:
    """Mean ΔNLL per layer (y) × component (x); one row of panels per model, one panel per strength.

    Cells whose headline test survives Benjamini–Hochberg (`marker` column, default significant_bh) get a black
    dot; cells that could not be tested (NULL flag: one seed of a stochastic kind, an overflowed loss) get a black
    cross, so "not significant" (no mark) is never shown for "could not test".
    The colour scale is symmetric-log and diverging around 0: ΔNLL spans orders of magnitude across
    strengths, and a negative ΔNLL (perturbation helped) must not look like "no effect".
    """
    chart = "sensitivity_heatmap"
    df = require_rows(significance, [*SIGNIFICANCE_NEEDED, marker], chart=chart, relation="significance")
    df, kind = select_kind(df, kind, chart=chart, relation="significance")
    df = collapse_expert_cells(df.assign(untested=df[marker].isna(), **{marker: df[marker].eq(True)}),
                               ["model", "component", "layer", "strength"], "mean_delta_nll", marker,
                               all_flag="untested")  # fmt: skip
    df, n_dropped = drop_nonfinite(df, "mean_delta_nll", chart=chart, relation="significance")
    df["layer_label"] = layer_labels(df["layer"])
    df["strength_label"] = df["strength"].map(lambda s: f"{STRENGTH_SYMBOLS.get(kind, 'strength')} = {float(s):g}")
    df["significant"] = df[marker].fillna(False).astype(bool)
    df["untested"] = df["untested"].astype(bool) & ~df["significant"]
    df["marker_label"] = np.select([df["significant"], df["untested"]], [SIGNIFICANT_LABEL, UNTESTED_LABEL], "")
    df = df[["model", "component", "layer", "layer_label", "strength", "strength_label", "mean_delta_nll",
             "significant", "untested", "marker_label"]
            + [c for c in ("ci_low", "ci_high", "p_bh") if c in df.columns]]  # fmt: skip

    strengths = sorted(df["strength"].unique())
    random_models = random_weight_models(df, models)
    rows = [
        _heatmap_row(df, model, kind=kind, strengths=strengths, plumbing_only=model in random_models)
        for model in sorted(df["model"].unique())
    ]
    # One row per model, each with its own layers, components and colour scale: a 4-layer random-weight
    # model must not show SmolLM2's 30 layers as empty rows, nor set the colour range of a pretrained model.
    stacked = alt.vconcat(*rows, spacing=28).resolve_scale(
        color="independent", shape="independent", x="independent", y="independent"
    )
    notes = [
        f"dot = {SIGNIFICANT_LABEL}: across-draw test (seed × document; deterministic kinds: clustered by document); "
        f"cross = {UNTESTED_LABEL}; no mark = tested, not significant" if marker == "significant_bh"
        else f"dot = cells where {marker} is true",
        "colour scale per model (symmetric log, centred on 0)",
        f"{n_dropped} cell(s) with non-finite ΔNLL not shown" if n_dropped else None,
    ]  # fmt: skip
    return finish(
        stacked, title=f"Mean ΔNLL by layer and component — {models_text(df['model'])}, {strength_text(kind, strengths)}",
        notes=notes, random_models=random_models, all_models=df["model"].unique(),
    )  # fmt: skip


def _heatmap_row(
    df: pd.DataFrame, model: str, *, kind: str, strengths: list[float], plumbing_only: bool
) -> alt.FacetChart:
    """One model's heatmap, faceted by strength, drawn from the parent's data filtered to `model`."""
    own = df.loc[df["model"] == model]
    magnitude = own["mean_delta_nll"].abs()
    # symlog is linear below `constant`: put the bend at the small end of the observed magnitudes
    constant = float(np.quantile(magnitude[magnitude > 0], 0.1)) if (magnitude > 0).any() else 1.0
    limit = float(magnitude.max()) or 1.0
    color = alt.Color(
        "mean_delta_nll:Q", title=f"{DELTA_NLL_TITLE}, {model}",
        scale=alt.Scale(type="symlog", constant=constant, scheme="redblue", reverse=True, domain=[-limit, limit]),
        legend=alt.Legend(orient="right", gradientLength=120),
    )  # fmt: skip
    tooltip = [c for c in ("model", "component", "layer_label", "strength", "mean_delta_nll", "ci_low", "ci_high",
                           "p_bh", "significant", "untested") if c in own.columns]  # fmt: skip
    base = alt.Chart().encode(
        x=alt.X("component:N", title="component", sort=sorted(own["component"].unique()),
                axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("layer_label:O", title="layer", sort=layer_sort_order(own["layer_label"])),
    )  # fmt: skip
    cells = base.mark_rect(stroke="white", strokeWidth=0.5).encode(color=color, tooltip=tooltip)
    # dot = significant, cross = could not be tested; an unmarked cell was tested and is not significant
    present = [(label, shape) for label, shape in ((SIGNIFICANT_LABEL, "circle"), (UNTESTED_LABEL, "cross"))
               if (own["marker_label"] == label).any()]  # fmt: skip
    marks = (
        # white outline: a black mark stays visible on the darkest red/blue cells
        base.mark_point(filled=True, size=28, color="black", stroke="white", strokeWidth=0.6)
        .encode(shape=alt.Shape("marker_label:N", title=None, legend=alt.Legend(orient="right", labelLimit=0),
                                scale=alt.Scale(domain=[label for label, _ in present],
                                                range=[shape for _, shape in present])))
        .transform_filter(alt.datum.marker_label != "")
    )  # fmt: skip
    # A shape legend over a filtered-empty layer makes vl-convert fail ("SVG has an invalid size"): draw the
    # marks layer only when some cell of this model is marked; the caption still says what each mark means.
    layers = (cells, marks) if present else (cells,)
    panels = (
        alt.layer(*layers)
        .transform_filter(alt.datum.model == model)
        # 26 px per component, but wide enough that neighbouring strength headers ("factor = 0.9") never touch
        .properties(width=max(26 * own["component"].nunique(), 90), height=alt.Step(18))
    )
    symbol = STRENGTH_SYMBOLS.get(kind, "strength")
    # every row carries the whole frame (Altair stores it once) and filters it: the stored spec keeps one
    # dataset that a reader can re-plot
    return panels.facet(
        data=df,
        column=alt.Column("strength_label:N", title=STRENGTH_TITLES.get(kind, "strength"),
                          sort=[f"{symbol} = {float(s):g}" for s in strengths],
                          header=alt.Header(labelFontWeight="bold")),
    ).properties(title=model_title(model, plumbing_only=plumbing_only))  # fmt: skip


def degradation_curves(
    frame: pd.DataFrame,
    *,
    kind: str | None = None,
    layer: int | None = None,
    metric: str = "delta_nll",
    models: pd.DataFrame | None = None,
) -> alt.VConcatChart:
    """Strength (log x; linear for norm gain factors) → mean ΔNLL or PPL ratio per component, one panel per
    model, with a band.

    `frame` is the `significance` relation (band: the mean of the per-layer 95% CIs, which bounds the CI of
    the layer mean from above since SD(Σx) ≤ Σ SD(x)) or the `sensitivity` relation (band: min..max over
    seeds). layer=None averages over measured layers; layer=L shows that layer only.
    """
    chart = "degradation_curves"
    if metric not in ("delta_nll", "ppl_ratio"):
        raise ValueError(f"{chart}(): metric must be 'delta_nll' or 'ppl_ratio', got {metric!r}")
    if isinstance(frame, pd.DataFrame) and "mean_delta_nll" in frame.columns:
        df = require_rows(frame, [*SIGNIFICANCE_NEEDED, "ci_low", "ci_high"], chart=chart, relation="significance")
        source = "significance"
    else:
        df = require_rows(frame, SENSITIVITY_NEEDED, chart=chart, relation="sensitivity")
        source = "sensitivity"
    df, kind = select_kind(df, kind, chart=chart, relation=source)
    if layer is not None:
        df = df.loc[pd.to_numeric(df["layer"], errors="coerce") == layer]
        if df.empty:
            raise ValueError(f"{chart}(): no `{source}` rows at layer {layer}; pass a measured layer or layer=None")
    curves = _curves_from_significance(df) if source == "significance" else _curves_from_sensitivity(df)
    curves, n_dropped = drop_nonfinite(curves, "value", chart=chart, relation=source)
    if metric == "ppl_ratio":
        curves[["value", "low", "high"]] = np.exp(curves[["value", "low", "high"]])
    if (curves["strength"] <= 0).any():
        raise ValueError(f"{chart}(): strengths must be > 0 for the log x-axis, got {sorted(curves['strength'].unique())}")

    y_title = DELTA_NLL_TITLE if metric == "delta_nll" else PPL_RATIO_TITLE
    # ticks at the measured strengths: a log axis over one decade otherwise crowds its labels. A norm gain
    # factor straddles 1 (0.9, 1.1): on a log axis its points nearly coincide, so it gets a linear one.
    x_scale = alt.Scale(type="linear", zero=False, padding=20) if kind == "scale" else alt.Scale(type="log")
    x = alt.X("strength:Q", title=STRENGTH_TITLES.get(kind, "strength"), scale=x_scale,
              axis=alt.Axis(values=sorted(float(v) for v in curves["strength"].unique()), format="~g"))  # fmt: skip
    color = alt.Color("component:N", title="component", legend=alt.Legend(orient="right"))
    band = alt.Chart().mark_area(opacity=0.18).encode(x=x, y=alt.Y("low:Q", title=y_title), y2="high:Q", color=color)
    tooltip = ["model", "component", "strength", alt.Tooltip("value:Q", title=metric, format=".4g"),
               alt.Tooltip("low:Q", format=".4g"), alt.Tooltip("high:Q", format=".4g")]  # fmt: skip
    line = alt.Chart().mark_line(point=True).encode(x=x, y=alt.Y("value:Q", title=y_title), color=color, tooltip=tooltip)
    layers = [band, line]
    if metric == "delta_nll":
        layers.insert(0, alt.Chart().mark_rule(color="#888888", strokeDash=[3, 3]).encode(y=alt.datum(0)))
    panels = alt.layer(*layers, data=curves).properties(width=260, height=200)
    faceted = panels.facet(**model_panels())
    faceted = faceted.resolve_scale(y="independent")
    where = f"layer {layer}" if layer is not None else "mean over measured layers"
    band_text = (
        "band: mean of per-layer 95% CIs (an upper bound on the CI of the layer mean)"
        if source == "significance" and layer is None
        else "band: 95% CI of the paired test" if source == "significance"
        else "band: min..max over seeds; line: seed mean"
    )  # fmt: skip
    notes = [f"{where}; {band_text}; y scale per model",
             f"{n_dropped} point(s) with non-finite ΔNLL not shown" if n_dropped else None]  # fmt: skip
    metric_name = "ΔNLL" if metric == "delta_nll" else "PPL ratio"
    return finish(
        faceted, title=f"Degradation: {kind} strength → {metric_name} — {models_text(curves['model'])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=curves["model"].unique(),
    )  # fmt: skip


def layer_profile_chart(sensitivity: pd.DataFrame, *, models: pd.DataFrame | None = None) -> alt.VConcatChart:
    """ΔNLL per layer (x) for each strength (colour), one panel per (model, component); the seed mean is
    the line, each seed's value a dot. This is what one sensitivity partition (model × component__seed) holds."""
    chart = "layer_profile_chart"
    df = require_rows(sensitivity, SENSITIVITY_NEEDED, chart=chart, relation="sensitivity")
    df, kind = select_kind(df, None if df["kind"].nunique() == 1 else "gaussian", chart=chart, relation="sensitivity")
    df, n_dropped = drop_nonfinite(df, "delta_nll", chart=chart, relation="sensitivity")
    df = _all_experts_rows(df)
    df["layer_label"] = layer_labels(df["layer"])
    df["panel"] = df["model"].astype(str) + " · " + df["component"].astype(str)
    # dropna=False: a seed-independent point (variant <component>__fixed) is stored once with seed NULL
    per_seed = df.groupby(["panel", "model", "component", "layer_label", "strength", "seed"], as_index=False,
                          dropna=False)[
        "delta_nll"
    ].mean()
    mean = per_seed.groupby(["panel", "model", "component", "layer_label", "strength"], as_index=False)["delta_nll"].mean()
    both = pd.concat([per_seed.assign(role="seed"), mean.assign(role="mean")], ignore_index=True)
    order = layer_sort_order(df["layer_label"])
    x = alt.X("layer_label:O", title="layer (0 = first decoder layer)", sort=order, axis=alt.Axis(labelAngle=0))
    y = alt.Y("delta_nll:Q", title=DELTA_NLL_TITLE)
    color = alt.Color("strength:O", title=STRENGTH_TITLES.get(kind, "strength"), scale=alt.Scale(scheme="viridis"))
    lines = alt.Chart().mark_line().encode(x=x, y=y, color=color).transform_filter(alt.datum.role == "mean")
    dots = (
        alt.Chart()
        .mark_point(size=30, opacity=0.7)
        .encode(x=x, y=y, color=color, tooltip=["model", "component", "layer_label", "strength", "seed",
                                                alt.Tooltip("delta_nll:Q", format=".4g")])
        .transform_filter(alt.datum.role == "seed")
    )  # fmt: skip
    rule = alt.Chart().mark_rule(color="#888888", strokeDash=[3, 3]).encode(y=alt.datum(0))
    seeds = sorted(int(s) for s in df["seed"].dropna().unique())
    panels = alt.layer(rule, lines, dots, data=both).properties(width=280, height=180)
    faceted = (
        panels.facet(facet=alt.Facet("panel:N", title=None, header=alt.Header(labelFontWeight="bold")), columns=3)
        if df["panel"].nunique() > 1
        else panels
    )
    notes = [f"line: mean over seeds {seeds}; dots: single seeds" if seeds else
             "seed-independent kind, measured once: line and dots are the one measurement",
             f"{n_dropped} row(s) with non-finite ΔNLL not shown" if n_dropped else None]  # fmt: skip
    return finish(
        faceted, title=f"ΔNLL per layer — {models_text(df['model'])}, {', '.join(sorted(df['component'].unique()))}, "
            f"{strength_text(kind, df['strength'].unique())}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip


def _curves_from_significance(df: pd.DataFrame) -> pd.DataFrame:
    if "expert" in df.columns and df["expert"].notna().any():
        df = pd.concat([
            collapse_expert_cells(df, ["model", "component", "layer", "strength"], column)[
                ["model", "component", "layer", "strength", column]].set_index(["model", "component", "layer", "strength"])
            for column in ("mean_delta_nll", "ci_low", "ci_high")
        ], axis=1).reset_index()  # fmt: skip
    grouped = df.groupby(["model", "component", "strength"], as_index=False).agg(
        value=("mean_delta_nll", "mean"), low=("ci_low", "mean"), high=("ci_high", "mean")
    )
    return grouped


def _curves_from_sensitivity(df: pd.DataFrame) -> pd.DataFrame:
    df = _all_experts_rows(df)
    per_seed = df.groupby(["model", "component", "strength", "seed"], as_index=False, dropna=False)["delta_nll"].mean()
    return per_seed.groupby(["model", "component", "strength"], as_index=False).agg(
        value=("delta_nll", "mean"), low=("delta_nll", "min"), high=("delta_nll", "max")
    )


def _all_experts_rows(df: pd.DataFrame) -> pd.DataFrame:
    """MoE: the all-experts rows (expert NULL) measure the component; single-expert rows would double count."""
    if "expert" not in df.columns or df["expert"].isna().all() or not df["expert"].isna().any():
        return df.copy()
    return df.loc[df["expert"].isna()].copy()


DOSE_RESPONSE_NEEDED = ["model", "kind", "component", "layer", "slope", "slope_ci_low", "slope_ci_high", "monotone"]


def dose_response_chart(
    dose_response: pd.DataFrame, *, kind: str | None = None, models: pd.DataFrame | None = None
) -> alt.VConcatChart:
    """Log–log dose–response slope per layer (x) and component (colour) with its CI; one panel per model.

    The dashed line at 2 is the small-σ expectation for Gaussian noise (ΔNLL ∝ σ²); hollow points are
    non-monotone responses. Rows without a slope (fewer than 3 usable strengths) are counted in the caption.
    """
    chart = "dose_response_chart"
    df = require_rows(dose_response, DOSE_RESPONSE_NEEDED, chart=chart, relation="dose_response")
    df, kind = select_kind(df, kind, chart=chart, relation="dose_response")
    df, n_dropped = drop_nonfinite(df, "slope", chart=chart, relation="dose_response")
    df["layer_label"] = layer_labels(df["layer"])
    df["response"] = np.where(df["monotone"].astype(bool), "monotone", "non-monotone")
    df = df[["model", "component", "layer_label", "slope", "slope_ci_low", "slope_ci_high", "response"]]
    x = alt.X("layer_label:N", title="layer", sort=layer_sort_order(df["layer_label"]))
    color = alt.Color("component:N", title="component", legend=alt.Legend(orient="right"))
    offset = alt.XOffset("component:N")
    bars = alt.Chart().mark_rule().encode(x=x, xOffset=offset, y=alt.Y("slope_ci_low:Q", title="log–log slope "
                                          "d ln ΔNLL / d ln strength"), y2="slope_ci_high:Q", color=color)  # fmt: skip
    points = alt.Chart().mark_point(size=50).encode(
        x=x, xOffset=offset, y="slope:Q", color=color,
        shape=alt.Shape("response:N", title="response", scale=alt.Scale(domain=["monotone", "non-monotone"],
                                                                         range=["circle", "triangle"])),
        fill=alt.condition("datum.response == 'monotone'", color, alt.value("white")),
        tooltip=["model", "component", "layer_label", alt.Tooltip("slope:Q", format=".3g"),
                 alt.Tooltip("slope_ci_low:Q", format=".3g"), alt.Tooltip("slope_ci_high:Q", format=".3g"), "response"],
    )  # fmt: skip
    two = alt.Chart().mark_rule(color="#888888", strokeDash=[4, 3]).encode(y=alt.datum(2))
    panels = alt.layer(two, bars, points, data=df).properties(width=320, height=200)
    faceted = panels.facet(**model_panels()).resolve_scale(y="independent", x="independent")
    notes = ["bars: 95% CI of the OLS slope of ln ΔNLL on ln strength (≥ 3 strengths); dashed: slope 2, "
             "the small-σ expectation for Gaussian noise; triangles: non-monotone responses",
             f"{n_dropped} cell(s) without a slope (fewer than 3 usable strengths) not shown" if n_dropped else None]
    return finish(
        faceted, title=f"Dose–response: {kind} strength → ΔNLL on log–log axes — {models_text(df['model'])}",
        notes=notes, random_models=random_weight_models(df, models), all_models=df["model"].unique(),
    )  # fmt: skip
