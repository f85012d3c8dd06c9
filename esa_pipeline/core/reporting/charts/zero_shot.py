"""Charts of zero-shot accuracy under perturbation (`zero_shot_significance`) and of where perplexity and task
accuracy disagree (`task_vs_perplexity_points` with `task_vs_perplexity`)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from esa_pipeline.core.reporting.charts._common import (
    DELTA_NLL_TITLE,
    finish,
    model_title,
    models_text,
    pretrained_first,
    random_weight_models,
    require_rows,
)

ACCURACY_NEEDED = ["model", "task", "kind", "component", "layer", "strength", "seed", "delta_accuracy", "ci_low",
                   "ci_high", "significant_bh"]  # fmt: skip
DISAGREEMENT_NEEDED = ["model", "task", "kind", "component", "layer", "strength", "seed", "delta_nll",
                       "delta_accuracy", "disagreement", "direction", "disagreement_rank"]  # fmt: skip
DIRECTION_COLORS = {"perplexity_only": "#d95f02", "task_only": "#7570b3", "agree": "#999999",
                    "not_ranked": "#cccccc"}
LABELLED_POINTS = 3


def point_labels(df: pd.DataFrame) -> pd.Series:
    """"<kind> <component> L<layer> s=<strength> #<seed>" per row (layer "—" when the point has none; no
    "#<seed>" for a seed-independent point, whose seed is NULL)."""
    layers = df["layer"].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    seeds = df["seed"].map(lambda v: "" if pd.isna(v) else f" #{int(v)}")
    return (df["kind"].astype(str) + " " + df["component"].astype(str) + " L" + layers + " s="
            + df["strength"].map(lambda v: f"{float(v):g}") + seeds)  # fmt: skip


def zero_shot_accuracy_chart(summary: pd.DataFrame, *, models: pd.DataFrame | None = None) -> alt.VConcatChart:
    """Δaccuracy (after − before) with its paired 95% CI per point, one row of panels per model, one panel per
    task; a filled dot marks a McNemar test that survives Benjamini–Hochberg across the model's points."""
    chart = "zero_shot_accuracy_chart"
    df = require_rows(summary, ACCURACY_NEEDED, chart=chart, relation="zero_shot_significance").copy()
    df["point"] = point_labels(df)
    # untested (NULL flag) is not "not significant": its own, grey, legend entry
    flag = df["significant_bh"].astype("boolean")
    df["significant"] = np.where(flag.isna(), "not tested", np.where(flag.fillna(False), "yes (BH)", "no"))
    random_models = random_weight_models(df, models)
    rows = []
    for model in pretrained_first(df["model"], random_models):
        part = df.loc[df["model"] == model]
        # The layers carry no data of their own: they inherit the facet's, so each task's panel draws that
        # task's rows only (a layer with its own data is not split by the facet: every panel drew every task).
        base = alt.Chart().encode(
            y=alt.Y("point:N", title=None, sort=alt.EncodingSortField("delta_accuracy", order="ascending")))
        bars = base.mark_rule().encode(x=alt.X("ci_low:Q", title="Δ accuracy (after − before)"), x2="ci_high:Q")
        # hollow = not significant: a dark outline keeps a white fill visible on the white background
        dots = base.mark_point(filled=True, size=60, stroke="#1b9e77", strokeWidth=1.5).encode(
            x="delta_accuracy:Q",
            fill=alt.Fill("significant:N", scale=alt.Scale(domain=["yes (BH)", "no", "not tested"],
                                                           range=["#1b9e77", "white", "#bbbbbb"]),
                          title="McNemar significant"),
            tooltip=["task", "point", "delta_accuracy", "ci_low", "ci_high", "significant"],
        )  # fmt: skip
        zero = alt.Chart().mark_rule(strokeDash=[4, 3], color="#888").encode(x=alt.datum(0.0))
        panel = alt.layer(zero, bars, dots).properties(width=260, height=max(60, 16 * part["point"].nunique()))
        rows.append(panel.facet(column=alt.Column("task:N", title=None), data=part).properties(
            title=model_title(str(model), plumbing_only=model in random_models)))
    grid = alt.vconcat(*rows)
    return finish(
        grid, title=f"Zero-shot accuracy under perturbation — {models_text(df['model'])}",
        notes=["each line: the paired 95% CI (Agresti–Min) of the accuracy change on the same items",
               "filled: exact McNemar p survives Benjamini–Hochberg across the model's points and tasks"],
        random_models=random_models, all_models=df["model"].unique(),
    )  # fmt: skip


def task_vs_perplexity_chart(points: pd.DataFrame, correlations: pd.DataFrame | None = None, *,
                             models: pd.DataFrame | None = None, task: str = "all") -> alt.VConcatChart:  # fmt: skip
    """ΔNLL (x) vs Δaccuracy (y) per point measured both ways, one panel per model, coloured by the direction
    of disagreement; the LABELLED_POINTS largest disagreements are named; the title gives Spearman's ρ."""
    chart = "task_vs_perplexity_chart"
    df = require_rows(points, DISAGREEMENT_NEEDED, chart=chart, relation="task_vs_perplexity_points")
    df = df.loc[df["task"] == task].copy()
    if df.empty:
        raise ValueError(f"{chart}(): no points for task {task!r}")
    df["point"] = point_labels(df)
    random_models = random_weight_models(df, models)
    panels = []
    for model in pretrained_first(df["model"], random_models):
        part = df.loc[df["model"] == model]
        rho = ""
        if correlations is not None and len(correlations):
            match = correlations.loc[(correlations["model"] == model) & (correlations["task"] == task)]
            if len(match) and pd.notna(match["spearman_rho"].iloc[0]):
                r = match.iloc[0]
                rho = f" — Spearman ρ = {r.spearman_rho:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}], n = {int(r.n_points)}"
                if r.note:  # overflowed points: counted in n and ranked, but a non-finite ΔNLL has no x position
                    rho += f" ({r.note}; not drawn)"
            elif len(match):
                rho = f" — ρ not computed: {match['note'].iloc[0]}"
        base = alt.Chart(part).encode(
            x=alt.X("delta_nll:Q", title=DELTA_NLL_TITLE), y=alt.Y("delta_accuracy:Q", title="Δ accuracy"))
        dots = base.mark_circle(size=70, opacity=0.85).encode(
            color=alt.Color("direction:N", scale=alt.Scale(domain=list(DIRECTION_COLORS),
                                                           range=list(DIRECTION_COLORS.values())),
                            title="disagreement"),
            tooltip=["point", "delta_nll", "delta_accuracy", "disagreement", "direction"],
        )  # fmt: skip
        labels = base.transform_filter(alt.datum.disagreement_rank <= LABELLED_POINTS).mark_text(
            align="left", dx=6, dy=-6, fontSize=10).encode(text="point:N")
        title = model_title(str(model), plumbing_only=model in random_models)
        title.text = f"{title.text}{rho}"
        panels.append(alt.layer(dots, labels).properties(width=360, height=240, title=title))
    grid = alt.concat(*panels, columns=2).resolve_scale(x="independent", y="independent")
    return finish(
        grid, title=f"Where perplexity and task accuracy disagree ({task} tasks) — {models_text(df['model'])}",
        notes=["orange: the point hurts perplexity much more than task accuracy (ΔNLL rank ≫ accuracy-loss rank)",
               "purple: the reverse; labelled: the largest rank disagreements",
               "light grey (not_ranked): no rank correlation (fewer than 4 points, or no variation): rank differences are chance"],
        random_models=random_models, all_models=df["model"].unique(),
    )  # fmt: skip
