"""The self-contained HTML report: set-up and provenance, baselines, zero-shot scores, and one section per
chart with a reading guide. Charts are embedded as PNG data URIs so the page opens offline; each chart is
also written next to it as `<name>.png` and its Vega-Lite spec as `<name>.vl.json`. Every file is written
atomically (temp file + os.replace), so a reader never sees half a report.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from esa_pipeline.core.reporting import charts
from esa_pipeline.core.reporting.charts._common import PLUMBING_NOTE

BASELINE_COLUMNS = {
    "model": "model", "dataset": "dataset", "window_tokens": "window (tokens)", "n_tokens": "tokens",
    "token_ppl": "token PPL", "word_ppl": "word PPL", "byte_ppl": "byte PPL",
    "token_accuracy": "token top-1 accuracy", "tokens_per_s": "tokens/s", "peak_mem_bytes": "peak memory",
    "dtype": "dtype", "flags": "sanity flags",
}  # fmt: skip
MODEL_COLUMNS = {
    "model": "model", "source": "source", "hf_id": "HF id", "revision": "revision", "architecture": "architecture",
    "dtype": "dtype", "device": "device", "n_layers": "layers", "params_total": "parameters (total)",
    "params_active": "parameters (active)", "attention_kind": "attention", "random_weights": "random weights",
}  # fmt: skip
PNG_SCALE = 2
SCALING_COLUMNS = ["family", "kind", "component", "strength", "param_basis", "n_models", "exponent", "exponent_ci_low",
                   "exponent_ci_high", "r2", "r2_required_p05", "p_value", "warnings"]  # fmt: skip

# Every relation build_report reads; the report asset loads exactly these.
REPORT_RELATIONS = [
    "models", "baselines", "zero_shot", "sensitivity", "significance", "seed_consistency", "dose_response",
    "critical_layers",
    "weight_importance", "importance_validation", "super_weights", "prediction_check", "moe_routing",
    "architecture_comparison", "group_comparison", "scaling_fit", "zero_shot_significance", "task_vs_perplexity",
    "task_vs_perplexity_points", "compression_sensitivity", "block_influence", "layer_drop_agreement",
    "compression_recipe",
]  # fmt: skip
RECIPE_REPORT_COLUMNS = ["model", "kind", "allocation", "budget", "achieved", "predicted_delta_nll",
                         "measured_delta_nll", "measured_kl", "additivity_ratio", "ratio_ci_low", "ratio_ci_high",
                         "restored", "note"]  # fmt: skip
SUPER_WEIGHT_COLUMNS = ["model", "layer", "param_name", "row", "col", "weight_value", "activation_in",
                        "activation_out", "spike_ratio"]  # fmt: skip
SUPER_WEIGHT_CAUSAL_COLUMNS = ["status", "zero_delta_nll", "control_mean", "control_max", "control_p"]
GROUP_COLUMNS = ["comparison", "kind", "component", "strength", "models_a", "models_b", "mean_a", "mean_b",
                 "difference", "welch_p", "mannwhitney_p", "warnings"]  # fmt: skip

READING_GUIDES = {
    "zero_shot": (
        "Task accuracy measured item by item at perturbation points (zero_shot.at), each item paired with its "
        "unperturbed answer: the line is the 95% CI of the accuracy change, a filled dot an exact McNemar test "
        "that survives Benjamini–Hochberg. The scatter sets the same points' ΔNLL against their accuracy change; "
        "Spearman's ρ (with its CI) says how far perplexity ranks the points as the tasks do, and the named "
        "points disagree most: orange hurts perplexity far more than the tasks, purple the reverse."
    ),
    "heatmap": (
        "Each cell is the mean increase in negative log-likelihood per token (ΔNLL, nats/token) when one "
        "component of one layer is perturbed, averaged over seeds and evaluation windows; red = worse than the "
        "unperturbed model, blue = better. A dot marks cells whose test survives Benjamini–Hochberg correction "
        "across the model's whole sweep: the across-draw test, whose uncertainty includes both the choice of "
        "noise draw (seed) and of text (documents, clustered), or for deterministic kinds the document-clustered "
        "test. Cells that could not be tested (e.g. an overflowed loss, one seed) carry a cross and a reason in "
        "the significance table; an unmarked cell was tested and is not significant. Compare rows (layers) within a column to "
        "find sensitive depths, and columns to rank components; compare panels left to right to see how the "
        "pattern scales with perturbation strength."
    ),
    "degradation": (
        "How fast quality falls as the perturbation grows: strength on a log axis, ΔNLL averaged over the "
        "measured layers per component. The band is the mean of the per-layer 95% confidence intervals, an upper "
        "bound on the uncertainty of the plotted mean. Curves that stay near 0 at small strengths and bend up "
        "late mark robust components; a curve that leaves 0 early marks a fragile one. The y scale differs per "
        "model."
    ),
    "dose_response": (
        "How ΔNLL grows with strength, per layer and component: the slope of ln ΔNLL against ln strength over "
        "the strengths measured (at least three), with its 95% CI. For Gaussian noise a second-order expansion "
        "predicts a slope of 2 at small σ (dashed line); a steeper slope means the damage accelerates beyond the "
        "quadratic regime, a shallower one that it saturates. Triangles mark non-monotone responses (ΔNLL "
        "rising then falling), which no single slope describes."
    ),
    "critical_layers": (
        "The overall layer profile (mean ΔNLL over components) placed at relative depth; red bars are critical "
        "layers: significant after Benjamini–Hochberg correction (or with an overflowed loss, the most sensitive "
        "outcome) and within the top 10% by ΔNLL. No minimum is forced: when no layer is significant none is "
        "red. Random-weight models have no critical layers."
    ),
    "seed_consistency": (
        "Spearman rank correlation between the layer profiles measured with different random seeds. ρ near 1 "
        "means the ranking of layers does not depend on the particular noise draw, so layer-level conclusions "
        "are safe; ρ near 0 means the profile is dominated by noise at this strength (often the smallest "
        "strengths, where ΔNLL is close to evaluation noise)."
    ),
    "architecture": (
        "Layer profiles of every model on a common relative-depth axis (layer / number of layers), one panel per "
        "component, at the largest strength measured. Solid lines are dense models, dashed lines mixture-of-"
        "experts models. Look for shared shapes (e.g. early layers most sensitive) and for components whose "
        "profile differs by architecture. Per-token ΔNLL is only comparable across models with similar "
        "tokenizers."
    ),
    "moe_routing": (
        "For mixture-of-experts models under router noise: the fraction of tokens whose top-k expert set "
        "changed, per layer. A high change rate with a small ΔNLL means the experts are interchangeable at that "
        "layer; a high change rate with a large ΔNLL means routing decisions matter there."
    ),
    "scaling": (
        "Model size against layer-averaged ΔNLL on log-log axes, the fitted power law and the confidence band "
        "of its exponent, fitted over the pretrained models of one family only (random-weight models never "
        "enter). A fit needs at least three such models; with fewer the section says \"not enough models\" "
        "instead of drawing a line. R² alone is cheap with a handful of models: the subtitle gives the R² "
        "needed for a significant slope at this number of models. Treat a fit over fewer than five models as a "
        "sketch."
    ),
    "importance": (
        "Distribution of the stored importance scores (log10) per metric. The metrics have unrelated units, so "
        "compare shapes, not positions: a long right tail means a few weights dominate (candidate super "
        "weights)."
    ),
    "validation": (
        "The causal test of an importance metric: perturbing the k highest-scoring weights should hurt far more "
        "than k random weights, and those more than the k lowest-scoring ones. Bars are seed means, dots single "
        "seeds. A metric with top ≈ random does not identify important weights."
    ),
    "prediction": (
        "The second-order (Fisher) prediction ΔNLL ≈ ½σ²·Σ rms²·diag F against the measured ΔNLL at small σ. "
        "Points on the dashed y = x line mean the quadratic approximation holds; points above it mean the "
        "real damage exceeds the local curvature estimate (non-quadratic regime or outlier weights). Points whose "
        "measured ΔNLL is below the evaluation noise floor (twice its SE over seeds, or the float32 resolution of "
        "a per-token NLL) are not measurements: they are left out and get no ratio."
    ),
}


@dataclass
class _Figure:
    name: str
    caption: str
    chart: alt.TopLevelMixin | None = None
    skipped: str | None = None  # why no chart: empty relation or unusable data


def build_report(tables: dict[str, pd.DataFrame], out_dir: Path, *, experiment: dict) -> Path:
    """Write `out_dir/index.html` (self-contained) plus `<chart>.png` and `<chart>.vl.json` per chart.

    `tables` maps relation names (docs/CONTRACTS.md) to frames; missing or empty relations get a section
    that says so. `experiment` is the experiment config as a dict (ExperimentConfig.model_dump()).
    Returns the path of index.html.
    """
    if not isinstance(experiment, dict):
        raise TypeError(f"build_report(): experiment must be the experiment config as a dict, got {type(experiment).__name__}")
    bad = {k: type(v).__name__ for k, v in tables.items() if not isinstance(v, pd.DataFrame)}
    if bad:
        raise TypeError(f"build_report(): every table must be a pandas DataFrame, got {bad}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [
        _setup_section(tables, experiment),
        _random_weights_section(tables),
        _blocked_section(tables, experiment),
        _baselines_section(tables.get("baselines")),
        _zero_shot_section(tables.get("zero_shot")),
    ]
    # Random-weight models never enter a headline chart: the charts above the appendix are drawn from the
    # pretrained models' rows only, and the same charts for the random-weight models form a separate appendix.
    random_models = _random_models(tables)
    for title, figures in _figures(_rows_of(tables, random_models, keep=False)):
        sections.append(_figure_section(title, figures, out_dir))
    sections.append(_zero_shot_under_perturbation_section(_rows_of(tables, random_models, keep=False), out_dir))
    sections.append(_token_budget_section(tables.get("sensitivity"), tables.get("baselines")))
    sections.append(_scaling_table_section(tables.get("scaling_fit")))
    sections.append(_group_comparison_section(tables.get("group_comparison")))
    sections.append(_super_weights_section(tables.get("super_weights")))
    sections.extend(_compression_sections(_rows_of(tables, random_models, keep=False)))
    if random_models:
        sections.append(_plumbing_appendix(_rows_of(tables, random_models, keep=True), random_models, out_dir))

    name = str(experiment.get("name", "experiment"))
    page = _PAGE.format(
        title=html.escape(f"ESA report — {name}"),
        generated=html.escape(datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        body="\n".join(sections),
    )
    index = out_dir / "index.html"
    _atomic_write(index, page.encode("utf-8"))
    return index


# ---------------------------------------------------------------------------------------------- sections


def _setup_section(tables: dict[str, pd.DataFrame], experiment: dict) -> str:
    zero_shot = experiment.get("zero_shot") or {}
    strengths = experiment.get("strengths") or {}
    rows = [
        ("experiment", experiment.get("name")),
        ("description", experiment.get("description")),
        ("protocol", experiment.get("protocol")),
        ("datasets", _join(experiment.get("datasets"))),
        ("window length (tokens)", experiment.get("window")),
        ("token budget per dataset", _int(experiment.get("token_budget"))),
        ("batch size", experiment.get("batch_size")),
        ("seeds", _join(experiment.get("seeds"))),
        ("strengths", "; ".join(f"{k}: {_join(v)}" for k, v in strengths.items() if v) or None),
        ("components", _join(experiment.get("components"))),
        ("layers", json.dumps(experiment["layers"]) if isinstance(experiment.get("layers"), dict)
         else experiment.get("layers")),
        ("zero-shot tasks", _join(zero_shot.get("tasks"))),
        ("zero-shot shots (num_fewshot)", zero_shot.get("num_fewshot")),
        ("zero-shot item limit per task", zero_shot.get("limit") or ("all items" if zero_shot else None)),
        ("code version(s)", _join(_distinct(tables, "code_version"))),
        ("config hash(es)", _join(_distinct(tables, "config_hash"))),
    ]  # fmt: skip
    setup = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_text(v)) if v not in (None, '') else '<em>not recorded</em>'}</td></tr>"
        for k, v in rows
    )
    overrides = {m: s for m, s in (experiment.get("models") or {}).items() if s}
    override_html = ""
    if overrides:
        items = "".join(
            f"<li><code>{html.escape(m)}</code>: {html.escape(json.dumps({k: v for k, v in s.items() if v is not None}, default=str))}</li>"
            for m, s in overrides.items()
        )
        override_html = f"<p>Per-model settings (override the defaults above):</p><ul>{items}</ul>"
    models = tables.get("models")
    if models is None or models.empty:
        models_html = _empty("models", "no model cards were materialized, so revisions are not known")
    else:
        frame = models.rename(columns={"name": "model"}) if "model" not in models.columns else models
        models_html = _table(frame, MODEL_COLUMNS)
    return (
        '<section id="setup"><h2>Set-up and provenance</h2>'
        f"<table class='kv'>{setup}</table>{override_html}<h3>Models and revisions</h3>{models_html}</section>"
    )


def _random_weights_section(tables: dict[str, pd.DataFrame]) -> str:
    random_models = sorted(_random_models(tables))
    if not random_models:
        return (
            '<section id="random-weights"><h2>Random-weight models</h2><p>None: every model in this report has '
            "pretrained weights.</p></section>"
        )
    names = ", ".join(f"<code>{html.escape(m)}</code>" for m in random_models)
    return (
        '<section id="random-weights" class="warning"><h2>Random-weight models — plumbing only</h2>'
        f"<p>{names} {'has' if len(random_models) == 1 else 'have'} random weights (tiny test models built "
        "from configs). Every number from them — baselines, ΔNLL, significance, fits — checks that the pipeline "
        "runs on that architecture's module layout; it says nothing about real language models. They are kept "
        "out of every headline chart and of scaling fits, architecture comparisons and critical layers; their "
        "charts are in the plumbing appendix at the end, each with the red subtitle "
        f"“{html.escape(PLUMBING_NOTE)}”, and table rows from them are marked "
        "<span class='badge'>random weights</span>.</p></section>"
    )


def blocked_models(tables: dict[str, pd.DataFrame], experiment: dict) -> dict[str, str]:
    """Model -> why its sweeps, analysis and cross-model rows are missing: the same rule as `esa materialize`'s
    `BLOCKED <model>: …` lines (core.evaluation.sanity.baseline_problems on the stored baselines; random-weight
    models, from `models`, are exempt from the plausible-PPL range), or no stored baseline at all."""
    from esa_pipeline.core.evaluation.sanity import baseline_problems

    baselines, cards = tables.get("baselines"), tables.get("models")
    out = {}
    for model in experiment.get("models") or {}:
        rows = baselines.loc[baselines["model"] == model] if baselines is not None and "model" in baselines else None
        if rows is None or rows.empty:
            out[model] = ("no baseline stored under the current settings: its model stage failed or has not run "
                          "(`esa materialize` prints the error)")
            continue
        card = cards.loc[cards["model"] == model] if cards is not None and "model" in cards else None
        random_weights = bool(card["random_weights"].fillna(False).iloc[0]) if card is not None and len(card) else False
        problems = baseline_problems(rows, random_weights=random_weights)
        if problems:
            out[model] = "blocking check baseline_sanity failed: " + "; ".join(problems)
    return out


def _blocked_section(tables: dict[str, pd.DataFrame], experiment: dict) -> str:
    blocked = blocked_models(tables, experiment)
    if not blocked:
        return ""
    items = "".join(f"<li><code>{html.escape(m)}</code>: {html.escape(why)}</li>" for m, why in blocked.items())
    return ('<section id="blocked" class="warning"><h2>Blocked models</h2><p>These models have no sweeps, '
            "analysis or cross-model rows in this report: every ratio against a broken or missing baseline "
            f"would be meaningless. Fix the model source (weights, tokenizer) or the dataset.</p><ul>{items}</ul>"
            "</section>")


def _baselines_section(baselines: pd.DataFrame | None) -> str:
    head = '<section id="baselines"><h2>Baselines</h2>'
    if baselines is None or baselines.empty:
        return head + _empty("baselines", "no baseline has been materialized") + "</section>"
    flagged = baselines.loc[baselines["flags"].fillna("").astype(str).str.len() > 0] if "flags" in baselines else baselines.iloc[0:0]
    if flagged.empty:
        flags_html = "<p>Sanity checks: no baseline was flagged.</p>"
    else:
        items = "".join(
            f"<li><code>{html.escape(str(r['model']))}</code> on {html.escape(str(r.get('dataset', '?')))}: "
            f"{html.escape(str(r['flags']).replace(';', '; '))}</li>"
            for _, r in flagged.iterrows()
        )
        flags_html = (
            "<div class='warning'><p><strong>Sanity flags raised</strong> (e.g. token PPL &lt; 2 on natural text "
            f"means repeated or leaked text, not a good model):</p><ul>{items}</ul></div>"
        )
    return head + flags_html + _table(baselines, BASELINE_COLUMNS) + "</section>"


def _zero_shot_section(zero_shot: pd.DataFrame | None) -> str:
    head = '<section id="zero-shot"><h2>Zero-shot scores</h2>'
    if zero_shot is None or zero_shot.empty:
        return head + _empty("zero_shot", "no zero-shot task was configured or run") + "</section>"
    frame = zero_shot.copy()
    if {"value", "stderr"} <= set(frame.columns):
        frame["score"] = [f"{v:.4f} ± {s:.4f}" if pd.notna(s) else f"{v:.4f} (no stderr)"
                          for v, s in zip(frame["value"], frame["stderr"], strict=True)]  # fmt: skip
    columns = {"model": "model", "task": "task", "metric": "metric", "score": "score ± stderr",
               "n_items": "items", "num_fewshot": "shots"}  # fmt: skip
    return head + _table(frame, columns) + "</section>"


def _table_section(anchor: str, title: str, relation: str, frame: pd.DataFrame | None, columns: list[str], *,
                   why_empty: str, guide: str | None = None) -> str:
    """A section holding one relation as a table, or saying why it is empty."""
    head = f'<section id="{anchor}"><h2>{html.escape(title)}</h2>'
    head += f"<p class='guide'>{html.escape(guide)}</p>" if guide else ""
    if frame is None or frame.empty:
        return head + _empty(relation, why_empty) + "</section>"
    return head + _table(frame, {c: c for c in columns}) + "</section>"


TOKEN_BUDGET_COLUMNS = ["model", "kind", "stop_reason", "points", "tokens_median", "tokens_min", "tokens_max",
                        "budget_tokens", "budget_fraction"]  # fmt: skip


def token_budget_summary(sensitivity: pd.DataFrame | None, baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tokens scored per sweep point, by model, kind and stop reason (adaptive budgets stop early; a fixed
    budget scores every window: stop_reason `fixed_budget`). budget_tokens is the fixed budget the points
    were drawn from: the baseline's n_tokens on the point's dataset and window (every point is paired with
    that baseline's windows); without a matching baseline row, the model's largest point, which understates
    the budget when every point stopped early."""
    if sensitivity is None or sensitivity.empty or "n_tokens" not in sensitivity.columns:
        return pd.DataFrame(columns=TOKEN_BUDGET_COLUMNS)
    frame = sensitivity.assign(stop_reason=sensitivity.get("stop_reason", pd.Series(index=sensitivity.index,
                                                                                   dtype=object)).fillna("fixed_budget"))
    frame = frame.reset_index(drop=True)
    budget = frame.groupby("model")["n_tokens"].transform("max")
    keys = ["model", "dataset", "window_tokens"]
    if baselines is not None and set(keys) | {"n_tokens"} <= set(baselines.columns) and set(keys) <= set(frame.columns):
        fixed = baselines.groupby(keys, as_index=False)["n_tokens"].max().rename(columns={"n_tokens": "_budget"})
        matched = frame[keys].merge(fixed, on=keys, how="left")["_budget"]
        budget = matched.where(matched.notna(), budget)
    frame = frame.assign(budget_tokens=budget)
    out = frame.groupby(["model", "kind", "stop_reason"], as_index=False).agg(
        points=("n_tokens", "size"), tokens_median=("n_tokens", "median"), tokens_min=("n_tokens", "min"),
        tokens_max=("n_tokens", "max"), budget_tokens=("budget_tokens", "max"),
    )  # fmt: skip
    out["budget_fraction"] = out["tokens_median"] / out["budget_tokens"]
    return out[TOKEN_BUDGET_COLUMNS]


def _token_budget_section(sensitivity: pd.DataFrame | None, baselines: pd.DataFrame | None = None) -> str:
    return _table_section(
        "token-budget", "Tokens used per sweep point", "sensitivity", token_budget_summary(sensitivity, baselines),
        TOKEN_BUDGET_COLUMNS, why_empty="no sweep points stored",
        guide="With `adaptive` on, a point stops once its confidence sequence has decided it (effect_resolved / "
              "practically_zero) or at the fixed budget (budget_spent), or at once when a window's ΔNLL is inf/NaN "
              "(non_finite); without it every point scores the whole budget (fixed_budget).",
    )  # fmt: skip


def _zero_shot_under_perturbation_section(tables: dict[str, pd.DataFrame], out_dir: Path) -> str:
    """Accuracy under perturbation and the task-vs-perplexity divergence chart, plus the correlation table."""
    from esa_pipeline.core.reporting.charts.zero_shot import (
        task_vs_perplexity_chart,
        zero_shot_accuracy_chart,
    )

    models = tables.get("models")
    models = models if models is not None and not models.empty else None
    summary, points, corr = (tables.get(k) for k in ("zero_shot_significance", "task_vs_perplexity_points",
                                                      "task_vs_perplexity"))  # fmt: skip
    figures = []
    if summary is None or summary.empty:
        figures.append(_Figure("zero_shot__accuracy", "accuracy under perturbation",
                               skipped=_empty_text("zero_shot_significance")))  # fmt: skip
    else:
        figures.append(_attempt("zero_shot__accuracy", "Δ accuracy with paired CI per point and task",
                                lambda: zero_shot_accuracy_chart(summary, models=models)))  # fmt: skip
    if points is None or points.empty:
        figures.append(_Figure("zero_shot__disagreement", "ΔNLL vs Δ accuracy",
                               skipped=_empty_text("task_vs_perplexity_points")))  # fmt: skip
    else:
        figures.append(_attempt("zero_shot__disagreement", "ΔNLL vs Δ accuracy over all tasks",
                                lambda: task_vs_perplexity_chart(points, corr, models=models)))  # fmt: skip
    section = _figure_section("Task accuracy under perturbation, and where perplexity disagrees", figures, out_dir)
    if corr is not None and not corr.empty:
        table = _table(corr, {c: c for c in ["model", "task", "n_points", "spearman_rho", "ci_low", "ci_high",
                                             "p_value", "note"]})  # fmt: skip
        section = section.replace("</section>", f"<h3>Rank correlation of ΔNLL and Δ accuracy</h3>{table}</section>")
    return section


def _scaling_table_section(scaling: pd.DataFrame | None) -> str:
    return _table_section("scaling-table", "Scaling fits (all cells)", "scaling_fit", scaling, SCALING_COLUMNS,
                          why_empty="fewer than the models needed, or the all-models assets have not run")


def _group_comparison_section(groups: pd.DataFrame | None) -> str:
    return _table_section(
        "group-comparison", "Dense vs MoE, instruct vs base", "group_comparison", groups, GROUP_COLUMNS,
        why_empty="the architecture_comparison asset has not run",
        guide="Model-level mean ΔNLL of group a minus group b per (kind, component, strength); component \"all\" "
        "averages the components. Welch's t and Mann–Whitney U compare the models' means (no test with fewer than "
        "2 models per group: the difference is then descriptive only).",
    )


def _super_weights_section(supers: pd.DataFrame | None) -> str:
    top = supers
    columns = list(SUPER_WEIGHT_COLUMNS)
    if supers is not None and not supers.empty:
        if "status" in supers.columns:  # rows with the causal test: confirmed first, then by effect
            columns += [c for c in SUPER_WEIGHT_CAUSAL_COLUMNS if c in supers.columns]
            top = supers.assign(_confirmed=supers["status"] == "confirmed").sort_values(
                ["_confirmed", "zero_delta_nll"], ascending=False)
        else:
            top = supers.sort_values("spike_ratio", ascending=False)
        top = top.groupby("model").head(5)
    return _table_section(
        "super-weights", "Super weights: confirmed and candidates", "super_weights", top, columns,
        why_empty="no dense model with an ffn.down of ≥ 3 layers was scored",
        guide="Per layer, the down-projection weight feeding the largest output activation spike (spike ratio = "
        "that activation over the layer's median) is a candidate. Each candidate is zeroed alone (zero_delta_nll, "
        "nats/token) and compared with 10 controls from the same matrix of matched magnitude rank, each zeroed "
        "alone: status \"confirmed\" means zeroing the candidate hurt (ΔNLL > 0) and more than every control (permutation "
        "p = control_p = 1/11); otherwise it stays a \"candidate\" — a spike without that effect is an outlier, "
        "not a super weight.",
    )


def _rows_of(tables: dict[str, pd.DataFrame], models: set[str], *, keep: bool) -> dict[str, pd.DataFrame]:
    """Every table's rows of `models` (keep=True) or of every other model (keep=False); tables without a
    model column (cross-model fits) and the `models` relation itself are passed through."""
    out = {}
    for name, frame in tables.items():
        if name == "models" or frame is None or "model" not in frame.columns:
            out[name] = frame
        else:
            out[name] = frame.loc[frame["model"].astype(str).isin(models) == keep]
    return out


def _plumbing_appendix(tables: dict[str, pd.DataFrame], random_models: set[str], out_dir: Path) -> str:
    """The charts of the random-weight models, apart from every finding: they check the plumbing only."""
    names = ", ".join(f"<code>{html.escape(m)}</code>" for m in sorted(random_models))
    parts = ['<section id="plumbing-appendix" class="warning"><h2>Plumbing appendix: random-weight models</h2>'
             f"<p>{names}: tiny models with random weights. These charts check that every stage runs on their "
             "module layouts; they are not results and are kept out of every chart above.</p></section>"]  # fmt: skip
    for title, figures in _figures(tables):
        drawn = [f for f in figures if f.chart is not None]
        if drawn:
            parts.append(_figure_section(f"Plumbing: {title}", drawn, out_dir, prefix="plumbing-"))
    return "\n".join(parts)


def _compression_sections(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Recipe (predicted vs measured), the most quantization-sensitive units, Block Influence vs layer_drop."""
    why = ("no pretrained model in the experiment's `compression:` section, or the compression asset has not run "
           "(random-weight models' rows are left out of these tables)")
    sens = tables.get("compression_sensitivity")
    top = None
    if sens is not None and not sens.empty and (sens["kind"] == "quantize").any():
        quant = sens[sens["kind"] == "quantize"]
        lowest = quant.groupby("model")["strength"].transform("min")
        top = (quant[quant["strength"] == lowest].sort_values("delta_nll", ascending=False).groupby("model").head(5)
               .rename(columns={"strength": "bits"}))  # fmt: skip
    return [
        _table_section(
            "compression-recipe", "Compression recipes: do per-layer sensitivities add up?", "compression_recipe",
            tables.get("compression_recipe"), RECIPE_REPORT_COLUMNS, why_empty=why,
            guide="A recipe assigns bits (or sparsity) per (layer, component) minimising the sum of the measured "
            "single-unit ΔNLLs under the average budget (exact knapsack ILP); 'uniform' gives every unit the budget. "
            "Both are then applied all at once and measured. additivity_ratio = measured / predicted ΔNLL with a "
            "95% document-bootstrap interval: near 1 the single-unit measurements can be trusted to build recipes; "
            "far above 1 the units interact and the recipe's prediction is optimistic. A ratio to a predicted ΔNLL <= 0 "
            "means nothing: it is empty, and note says why.",
        ),
        _table_section(
            "quantize-top", "Most quantization-sensitive units (lowest bit width measured)", "compression_sensitivity",
            top, ["model", "layer", "component", "bits", "mode", "group_size", "delta_nll", "kl", "relative_change"],
            why_empty=why,
            guide="Round-to-nearest fake quantization of one (layer, component) at a time; relative_change is the "
            "effective ‖ΔW‖/‖W‖. These are the units a mixed-precision recipe keeps at more bits.",
        ),
        _table_section(
            "block-influence", "Block Influence vs measured layer drop", "layer_drop_agreement",
            tables.get("layer_drop_agreement"),
            ["model", "measure", "span", "drop_component", "spearman_rho", "p_value", "n_layers", "note"],
            why_empty=why,
            guide="Spearman ρ between a one-pass similarity measure (ShortGPT's Block Influence = 1 − cos between a "
            "layer's input and output; angular distance, Gromov et al.) and the ΔNLL measured by bypassing each "
            "layer. ρ near 1: the cheap measure ranks layers as removing them actually hurts.",
        ),
    ]


def _figure_section(title: str, figures: list[_Figure], out_dir: Path, *, prefix: str = "") -> str:
    guide = figures[0].name.split("__")[0]
    anchor = prefix + guide
    parts = [f'<section id="{html.escape(anchor)}"><h2>{html.escape(title)}</h2>',
             f"<p class='guide'>{html.escape(READING_GUIDES[guide])}</p>"]  # fmt: skip
    for figure in figures:
        if figure.chart is None:
            parts.append(f"<p class='empty'>{html.escape(figure.skipped or 'not drawn')}</p>")
            continue
        png = charts.to_png(figure.chart, scale=PNG_SCALE)
        _atomic_write(out_dir / f"{prefix}{figure.name}.png", png)
        _atomic_write(out_dir / f"{prefix}{figure.name}.vl.json", figure.chart.to_json().encode("utf-8"))
        width = charts.png_size(png)[0] // PNG_SCALE  # shown at CSS size: the extra pixels make it crisp on HiDPI
        parts.append(
            f"<figure><img src='{charts.png_data_uri(png)}' width='{width}' alt='{html.escape(figure.caption)}'>"
            f"<figcaption>{html.escape(figure.caption)} — files: <code>{html.escape(prefix + figure.name)}.png</code>, "
            f"<code>{html.escape(prefix + figure.name)}.vl.json</code></figcaption></figure>"
        )
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- figures


def _figures(tables: dict[str, pd.DataFrame]) -> list[tuple[str, list[_Figure]]]:
    """(section title, figures) in report order; a figure whose data are missing carries the reason."""
    models = tables.get("models")
    models = models if models is not None and not models.empty else None

    def per_kind(name: str, relation: str, build: Callable[[pd.DataFrame, str], alt.TopLevelMixin], what: str):
        frame = tables.get(relation)
        if frame is None or frame.empty:
            return [_Figure(name, what, skipped=_empty_text(relation))]
        return [_attempt(f"{name}__{kind}", f"{what} ({kind})", lambda k=kind: build(frame, k))
                for kind in sorted(frame["kind"].astype(str).unique())]  # fmt: skip

    def single(name: str, relation: str, build: Callable[[pd.DataFrame], alt.TopLevelMixin], what: str):
        frame = tables.get(relation)
        if frame is None or frame.empty:
            return [_Figure(name, what, skipped=_empty_text(relation))]
        return [_attempt(name, what, lambda: build(frame))]

    return [
        ("Sensitivity by layer and component", per_kind(
            "heatmap", "significance", lambda f, k: charts.sensitivity_heatmap(f, kind=k, models=models),
            "mean ΔNLL per layer × component")),
        ("Degradation curves", per_kind(
            "degradation", "significance", lambda f, k: charts.degradation_curves(f, kind=k, models=models),
            "strength → ΔNLL per component")),
        ("Dose–response slopes", per_kind(
            "dose_response", "dose_response", lambda f, k: charts.dose_response_chart(f, kind=k, models=models),
            "log–log slope of ΔNLL against strength")),
        ("Critical layers", per_kind(
            "critical_layers", "critical_layers", lambda f, k: charts.critical_layers_chart(f, kind=k, models=models),
            "critical layers of the overall profile")),
        ("Cross-seed consistency", per_kind(
            "seed_consistency", "seed_consistency",
            lambda f, k: charts.seed_consistency_chart(f, kind=k, models=models), "Spearman ρ between seeds")),
        ("Architecture comparison", per_kind(
            "architecture", "architecture_comparison", lambda f, k: charts.architecture_chart(f, kind=k, models=models),
            "layer profiles on relative depth")),
        ("MoE routing", single(
            "moe_routing", "moe_routing", lambda f: charts.moe_routing_chart(f, models=models),
            "expert-selection change rate")),
        ("Scaling with model size", _scaling_figures(tables)),
        ("Weight importance", single(
            "importance", "weight_importance", lambda f: charts.importance_distribution_chart(f, models=models),
            "importance score distributions")),
        ("Importance validation: top-k vs random-k vs bottom-k", per_kind(
            "validation", "importance_validation",
            lambda f, k: charts.importance_validation_chart(f, kind=k, models=models), "causal check of importance")),
        ("Prediction check", single(
            "prediction", "prediction_check", lambda f: charts.prediction_chart(f, models=models),
            "predicted vs measured ΔNLL")),
    ]  # fmt: skip


def _scaling_figures(tables: dict[str, pd.DataFrame]) -> list[_Figure]:
    """Per kind: the cell at the largest strength with the most models (then the best R²), total parameters."""
    fits, sensitivity, models = (tables.get(k) for k in ("scaling_fit", "sensitivity", "models"))
    for relation, frame in (("scaling_fit", fits), ("sensitivity", sensitivity), ("models", models)):
        if frame is None or frame.empty:
            return [_Figure("scaling", "scaling fit", skipped=_empty_text(relation))]
    figures = []
    for kind, cells in fits.loc[fits["param_basis"] == "total"].groupby("kind", sort=True):
        fitted = cells.loc[cells["exponent"].notna()]
        if fitted.empty:  # a line needs >= 3 pretrained models of one family: say so instead of drawing points
            reasons = sorted({str(w).split(";")[0] for w in cells["warnings"] if str(w)})
            figures.append(_Figure(f"scaling__{kind}", f"scaling fit ({kind})",
                                   skipped="No scaling fit: " + " | ".join(reasons or ["not enough models"])))
            continue
        fitted = fitted.loc[fitted["strength"] == fitted["strength"].max()]
        best = fitted.sort_values(["n_models", "r2"], ascending=False).iloc[0]
        figures.append(_attempt(
            f"scaling__{kind}", f"scaling fit ({kind}, {best['component']}, family {best['family']})",
            lambda kind=kind, best=best: charts.scaling_chart(
                fits, sensitivity, models, kind=kind, component=best["component"], strength=float(best["strength"]),
                family=best["family"]),
        ))  # fmt: skip
    return figures or [_Figure("scaling", "scaling fit", skipped="No scaling_fit rows with total parameters.")]


def _attempt(name: str, caption: str, build: Callable[[], alt.TopLevelMixin]) -> _Figure:
    """Builders raise ValueError when the rows cannot make a chart (all NaN, nothing positive on a log axis):
    the report states that reason in place of the chart instead of failing the whole report."""
    try:
        return _Figure(name, caption, chart=build())
    except ValueError as error:
        return _Figure(name, caption, skipped=f"Not drawn: {error}")


# ---------------------------------------------------------------------------------------------- helpers


def _random_models(tables: dict[str, pd.DataFrame]) -> set[str]:
    found: set[str] = set()
    for frame in tables.values():
        if frame is None or frame.empty or "random_weights" not in frame.columns:
            continue
        name_column = "model" if "model" in frame.columns else "name" if "name" in frame.columns else None
        if name_column:
            found |= set(frame.loc[frame["random_weights"].fillna(False).astype(bool), name_column].astype(str))
    return found


def _table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    present = [c for c in columns if c in frame.columns]
    random_flags = frame["random_weights"].fillna(False).astype(bool) if "random_weights" in frame.columns else None
    head = "".join(f"<th>{html.escape(columns[c])}</th>" for c in present)
    body = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cells = []
        for c in present:
            text = html.escape(_format(c, row[c]))
            if c == "model" and random_flags is not None and bool(random_flags.iloc[i]):
                text += " <span class='badge'>random weights</span>"
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _format(column: str, value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "—"
    if column == "peak_mem_bytes":
        return f"{float(value) / 2**30:.2f} GiB" if float(value) >= 2**30 else f"{float(value) / 2**20:.0f} MiB"
    if column.startswith("params") or column in ("n_tokens", "n_items"):
        return f"{int(value):,}"
    if column == "flags":
        return str(value).replace(";", "; ") or "none"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _empty(relation: str, why: str) -> str:
    return f"<p class='empty'>{html.escape(_empty_text(relation))} ({html.escape(why)}).</p>"


def _empty_text(relation: str) -> str:
    return f"The `{relation}` relation is empty: nothing to show in this section."


def _distinct(tables: dict[str, pd.DataFrame], column: str) -> list[str]:
    values: set[str] = set()
    for frame in tables.values():
        if frame is not None and column in frame.columns:
            values |= {str(v) for v in frame[column].dropna().unique()}
    return sorted(values)


def _join(values: object) -> str | None:
    if values is None:
        return None
    if isinstance(values, (list, tuple)):
        return ", ".join(str(v) for v in values) if values else None
    return str(values)


def _int(value: object) -> str | None:
    return f"{int(value):,}" if isinstance(value, (int, np.integer)) else None if value is None else str(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temp, 0o644)  # mkstemp creates 0600; a report is meant to be read by others
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1400px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
thead th {{ background: #f4f4f4; }} table.kv th {{ background: #f9f9f9; width: 16em; }}
.warning {{ background: #fff3f3; border-left: 4px solid #b30000; padding: 0.2em 1em; }}
.badge {{ background: #b30000; color: white; border-radius: 3px; padding: 0 0.4em; font-size: 0.8em; }}
.empty {{ color: #8a5a00; background: #fff8e6; padding: 0.5em 1em; border-left: 4px solid #e0a000; }}
.guide {{ max-width: 60em; }} figure {{ margin: 1em 0 2em 0; }} figure img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.85em; }}
</style></head>
<body><h1>{title}</h1><p>Generated {generated}. ΔNLL is the increase in mean negative log-likelihood per token
(nats/token) over the unperturbed baseline on the same evaluation windows.</p>
{body}
</body></html>
"""
