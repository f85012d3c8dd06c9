"""Chart builders on small relations shaped like the stored ones: every chart renders to a real PNG with
titled, unit-labelled axes; random-weight data are labelled; empty or malformed input raises."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest

from esa_pipeline.core import analysis
from esa_pipeline.core.reporting import charts
from esa_pipeline.core.reporting.charts.sensitivity import SIGNIFICANT_LABEL, UNTESTED_LABEL

MODELS = {
    # name: (family, is_moe, n_layers, params_total, params_active, vocab, random_weights)
    "smollm2-135m": ("llama", False, 4, 134_515_008, 134_515_008, 49_152, False),
    "tiny-mixtral": ("mixtral", True, 4, 1_200_000, 400_000, 259, True),
    "pythia-1.4b": ("gpt_neox", False, 4, 1_414_647_808, 1_414_647_808, 50_304, False),
    "llama-3.1-8b": ("llama", False, 4, 8_030_261_248, 8_030_261_248, 128_256, False),
    "llama-3.2-1b": ("llama", False, 4, 1_235_814_400, 1_235_814_400, 128_256, False),
}
MODEL_SPREAD = {"smollm2-135m": 1.0, "tiny-mixtral": 0.8, "pythia-1.4b": 1.4, "llama-3.1-8b": 0.9, "llama-3.2-1b": 1.1}
COMPONENTS = {"attention.query": 0.6, "ffn.down": 1.4, "norm.input": 0.3}
STRENGTHS = (0.01, 0.1)
SEEDS = (0, 1)
N_WINDOWS, WINDOW_TOKENS = 6, 128


def models_relation(names: list[str]) -> pd.DataFrame:
    rows = []
    for name in names:
        family, is_moe, n_layers, total, active, vocab, random_weights = MODELS[name]
        rows.append({
            "model": name, "family": family, "architecture": f"{family.title()}ForCausalLM", "is_moe": is_moe,
            "instruct": name == "smollm2-135m", "n_layers": n_layers, "params_total": total, "params_active": active,
            "vocab_size": vocab, "random_weights": random_weights, "dtype": "float32",
            "revision": "random-seed-0" if random_weights else f"rev-{name}", "source": "tiny" if random_weights else "hub",
        })  # fmt: skip
    return pd.DataFrame(rows)


def sweep_relations(names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sensitivity, sensitivity_windows): ΔNLL grows with σ², depth and size^-0.3, plus window noise."""
    rng = np.random.default_rng(7)
    rows, windows = [], []
    for name in names:
        _, _, n_layers, total, _, _, random_weights = MODELS[name]
        for component, weight in COMPONENTS.items():
            for layer in range(n_layers):
                for strength in STRENGTHS:
                    for seed in SEEDS:
                        effect = 40 * strength**2 * weight * (1 + layer) * (total / 1e8) ** -0.3 * MODEL_SPREAD[name]
                        # absolute window noise: the small-σ cells are not all significant
                        per_window = effect + 0.02 * rng.standard_normal(N_WINDOWS)
                        delta = float(per_window.mean())
                        rows.append({
                            "model": name, "dataset": "bundled", "window_tokens": WINDOW_TOKENS, "variant": f"{component}__{seed}",
                            "kind": "gaussian", "component": component, "layer": layer, "expert": pd.NA,
                            "strength": strength, "seed": seed, "mode": "noise", "selection": "random",
                            "delta_nll": delta, "ppl_ratio": np.exp(delta), "ppl_ratio_se": 0.01, "kl": delta * 0.9,
                            "top1_agreement": 0.95, "token_ppl": 12.0 * np.exp(delta), "nll_sum": 1.0,
                            "n_tokens": N_WINDOWS * WINDOW_TOKENS, "nonfinite": False, "relative_change": strength,
                            "changed_fraction": 1.0, "n_changed": 1000, "restored": True, "used_prefix_cache": True,
                            "tokens_per_s": 500.0, "elapsed_s": 0.5, "random_weights": random_weights,
                        })  # fmt: skip
                        for window_id, value in enumerate(per_window):
                            windows.append({
                                "model": name, "dataset": "bundled", "kind": "gaussian", "component": component,
                                "layer": layer, "expert": pd.NA, "strength": strength, "seed": seed,
                                "window_id": window_id, "nll_sum": 300.0, "n_tokens": WINDOW_TOKENS,
                                "delta_nll_sum": value * WINDOW_TOKENS,
                            })  # fmt: skip
    sensitivity, sensitivity_windows = pd.DataFrame(rows), pd.DataFrame(windows)
    for frame in (sensitivity, sensitivity_windows):
        frame["layer"] = frame["layer"].astype("Int64")
        frame["expert"] = frame["expert"].astype("Int64")
    return sensitivity, sensitivity_windows


def zero_shot_relations(sensitivity: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, ...]:
    """zero_shot_significance / task_vs_perplexity(_points) through the real analysis code: 20 items per point at
    six sweep points per model, each item lost with a probability that grows with the point's ΔNLL."""
    from esa_pipeline.core.analysis.zero_shot_stats import task_vs_perplexity, zero_shot_summary

    spec = ["kind", "component", "layer", "expert", "strength", "seed", "mode", "selection"]
    frames = []
    for model, rows in sensitivity.groupby("model"):
        points = rows.sort_values("delta_nll", ascending=False).head(6)
        for point in points.itertuples(index=False):
            before = rng.random(20) < 0.7
            lost = rng.random(20) < min(0.9, max(0.0, float(point.delta_nll)))
            frames.append(pd.DataFrame({
                "model": model, "task": "esa_knowledge", **{c: getattr(point, c) for c in spec},
                "group_size": pd.NA, "item_id": [f"k{i}" for i in range(20)], "correct_before": before,
                "correct_after": before & ~lost, "margin_before": 1.0, "margin_after": 0.5, "restored": True,
                "random_weights": bool(point.random_weights),
            }))  # fmt: skip
    summary = zero_shot_summary(pd.concat(frames, ignore_index=True))
    corr, points = task_vs_perplexity(summary, sensitivity)
    return summary, corr, points


def compression_fixture(names: list[str]) -> dict[str, pd.DataFrame]:
    from esa_pipeline_tests.core.test_compression_recipe import compression_fixture as build

    return build(names)


def fixture_relations(names: tuple[str, ...] = ("smollm2-135m", "tiny-mixtral")) -> dict[str, pd.DataFrame]:
    """Every relation the charts and the report read, for `names`, derived through the real analysis code."""
    names = list(names)
    models = models_relation(names)
    sensitivity, sensitivity_windows = sweep_relations(names)
    significance = analysis.significance(sensitivity_windows, sensitivity)
    rng = np.random.default_rng(11)
    moe = [n for n in names if MODELS[n][1]]
    routing = pd.DataFrame([
        {"model": m, "layer": layer, "strength": s, "seed": seed,
         "expert_change_rate": min(1.0, 3 * s * (1 + 0.2 * layer) + 0.02 * rng.random()),
         "load_entropy_baseline": 1.9, "load_entropy_perturbed": 1.85, "delta_nll": s * 0.5}
        for m in moe for layer in range(4) for s in STRENGTHS for seed in SEEDS
    ])  # fmt: skip
    importance = pd.DataFrame([
        {"model": m, "metric": metric, "scope": "global", "component": "ffn.down", "layer": i % 4, "expert": pd.NA,
         "param_name": f"model.layers.{i % 4}.mlp.down_proj.weight", "flat_index": i, "row": i // 64, "col": i % 64,
         "score": float(rng.lognormal(mean=shift, sigma=1.2)), "rank": i + 1, "k": 200}
        for m in names for metric, shift in (("grad_x_weight", -8), ("magnitude", -3), ("hutchinson", -12))
        for i in range(200)
    ])  # fmt: skip
    validation = pd.DataFrame([
        {"model": m, "metric": metric, "kind": "zero", "selection": sel, "component": "ffn.down", "layer": 1,
         "strength": k / 1e5, "seed": seed, "k": k,
         "delta_nll": {"top": 0.8, "random": 0.05, "bottom": 0.001}[sel] * k / 100 * (1 + 0.1 * rng.standard_normal()),
         "ppl_ratio": 1.0, "relative_change": 0.01, "changed_fraction": k / 1e5, "restored": True}
        for m in names for metric in ("grad_x_weight", "magnitude") for sel in ("top", "random", "bottom")
        for k in (10, 100) for seed in SEEDS
    ])  # fmt: skip
    # weight_importance validates with several kinds: charts and report must pick one per figure
    validation = pd.concat([validation, validation.assign(kind="sign_flip")], ignore_index=True)
    small = sensitivity.loc[sensitivity["strength"] == STRENGTHS[0]]
    prediction = small.groupby(["model", "component", "layer", "strength"], as_index=False)["delta_nll"].mean()
    prediction = prediction.rename(columns={"delta_nll": "measured_delta_nll"})
    prediction["predicted_delta_nll"] = prediction["measured_delta_nll"] * rng.uniform(0.6, 1.3, len(prediction))
    prediction["ratio"] = prediction["measured_delta_nll"] / prediction["predicted_delta_nll"]
    prediction["measured_se"] = 0.001
    prediction["noise_floor"] = 0.002
    prediction["below_noise_floor"] = prediction["measured_delta_nll"].abs() < 0.002
    baselines = pd.DataFrame([
        {"model": m, "dataset": "bundled", "window_tokens": WINDOW_TOKENS, "n_windows": N_WINDOWS,
         "n_tokens": N_WINDOWS * WINDOW_TOKENS, "n_words": 600, "n_bytes": 3500, "nll_sum": 1900.0,
         "token_ppl": 11.8 if not MODELS[m][6] else 262.0, "word_ppl": 24.1, "byte_ppl": 1.9,
         "token_accuracy": 0.41, "tokens_per_s": 535.0, "peak_mem_bytes": 1_200_000_000,
         "flags": "" if not MODELS[m][6] else "random_weights", "dtype": "float32", "random_weights": MODELS[m][6]}
        for m in names
    ])  # fmt: skip
    zero_shot = pd.DataFrame([
        {"model": m, "task": task, "metric": "acc", "value": value, "stderr": 0.05, "n_items": 20,
         "num_fewshot": 0, "random_weights": MODELS[m][6]}
        for m in names for task, value in (("esa_mc", 0.55), ("piqa", 0.61))
    ])  # fmt: skip
    supers = pd.DataFrame({
        "model": "smollm2-135m", "layer": [1, 2], "param_name": [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)],
        "row": [507, 12], "col": [1229, 40], "weight_value": [5.9, -0.4], "activation_in": [3065.0, 2.1],
        "activation_out": [24882.0, 30.0], "spike_ratio": [152.0, 1.6], "zero_delta_nll": [2.31, 0.0004],
        "n_controls": 10, "control_mean": [0.001, 0.0003], "control_sd": [0.0005, 0.0002],
        "control_max": [0.002, 0.0009], "control_delta_nlls": ["0.001", "0.0003"], "control_p": [1 / 11, 5 / 11],
        "confirmed": [True, False], "status": ["confirmed", "candidate"],
    })  # fmt: skip
    # a third, larger strength (ΔNLL × 9 = σ² scaling) so that every cell has a dose-response slope
    strongest = sensitivity.loc[sensitivity["strength"] == STRENGTHS[-1]]
    dosed = pd.concat([sensitivity, strongest.assign(strength=0.3, delta_nll=strongest["delta_nll"] * 9)])
    architecture = analysis.architecture_comparison(sensitivity, models)
    groups = pd.concat([analysis.dense_vs_moe(architecture, models), analysis.instruct_vs_base(architecture, models)],
                       ignore_index=True)  # fmt: skip
    zero_shot_summary, task_corr, task_points = zero_shot_relations(sensitivity, rng)
    return {
        "zero_shot_significance": zero_shot_summary, "task_vs_perplexity": task_corr,
        "task_vs_perplexity_points": task_points,
        "models": models, "baselines": baselines, "zero_shot": zero_shot, "sensitivity": sensitivity,
        "sensitivity_windows": sensitivity_windows, "significance": significance,
        "seed_consistency": analysis.seed_consistency(sensitivity), "dose_response": analysis.dose_response(dosed),
        "critical_layers": analysis.critical_layers(significance, models),
        "architecture_comparison": architecture, "group_comparison": groups, "super_weights": supers,
        "scaling_fit": analysis.scaling_fit(sensitivity, models), "moe_routing": routing,
        "weight_importance": importance, "importance_validation": validation, "prediction_check": prediction,
        **compression_fixture(names),
    }  # fmt: skip


@pytest.fixture(scope="module")
def relations() -> dict[str, pd.DataFrame]:
    return fixture_relations()


@pytest.fixture(scope="module")
def scaling_relations() -> dict[str, pd.DataFrame]:
    names = ("smollm2-135m", "pythia-1.4b", "llama-3.1-8b", "llama-3.2-1b", "tiny-mixtral")
    models = models_relation(list(names))
    sensitivity, _ = sweep_relations(list(names))
    return {"models": models, "sensitivity": sensitivity, "scaling_fit": analysis.scaling_fit(sensitivity, models)}


def build(name: str, rel: dict[str, pd.DataFrame]):
    """The chart `name` from the fixture relations, as the report builds it."""
    builders = {
        "heatmap": lambda: charts.sensitivity_heatmap(rel["significance"], models=rel["models"]),
        "degradation": lambda: charts.degradation_curves(rel["significance"], models=rel["models"]),
        "dose_response": lambda: charts.dose_response_chart(rel["dose_response"], models=rel["models"]),
        "layer_profile": lambda: charts.layer_profile_chart(rel["sensitivity"]),
        "critical_layers": lambda: charts.critical_layers_chart(rel["critical_layers"], models=rel["models"]),
        "seed_consistency": lambda: charts.seed_consistency_chart(rel["seed_consistency"], models=rel["models"]),
        "architecture": lambda: charts.architecture_chart(rel["architecture_comparison"], models=rel["models"]),
        "moe_routing": lambda: charts.moe_routing_chart(rel["moe_routing"], models=rel["models"]),
        "importance": lambda: charts.importance_distribution_chart(rel["weight_importance"], models=rel["models"]),
        "validation": lambda: charts.importance_validation_chart(rel["importance_validation"], kind="zero",
                                                                      models=rel["models"]),
        "prediction": lambda: charts.prediction_chart(rel["prediction_check"], models=rel["models"]),
    }
    return builders[name]()


# chart -> (marks that must appear, encoding fields that must appear, words the title must contain)
EXPECTED = {
    "heatmap": ({"rect", "point"}, {"component", "layer_label", "mean_delta_nll", "strength_label", "model"},
                ["Mean ΔNLL", "gaussian σ"]),
    "degradation": ({"area", "line"}, {"strength", "value", "low", "high", "component", "model"},
                    ["Degradation", "smollm2-135m"]),
    "dose_response": ({"rule", "point"}, {"layer_label", "slope", "slope_ci_low", "component", "model"},
                      ["Dose–response", "log–log"]),
    "layer_profile": ({"line", "point"}, {"layer_label", "delta_nll", "strength"}, ["ΔNLL per layer", "σ"]),
    "critical_layers": ({"bar", "text"}, {"depth", "mean_delta_nll", "status"}, ["Critical layers", "σ = 0.1"]),
    "seed_consistency": ({"point", "rule"}, {"spearman_rho", "component", "strength"}, ["Cross-seed", "σ"]),
    "architecture": ({"line"}, {"depth", "mean_delta_nll", "model", "architecture", "component"},
                     ["Architecture comparison", "σ = 0.1"]),
    "moe_routing": ({"line", "point"}, {"layer", "expert_change_rate", "strength"}, ["MoE routing", "tiny-mixtral"]),
    "importance": ({"bar"}, {"log10_score", "model"}, ["Weight-importance"]),
    "validation": ({"bar", "point"}, {"k_label", "selection", "delta_nll", "metric", "model"}, ["top-k vs random-k"]),
    "prediction": ({"line", "point"}, {"predicted_delta_nll", "measured_delta_nll", "component", "model"},
                   ["prediction vs measured"]),
}  # fmt: skip
AXIS_TITLES = {
    "heatmap": [charts.DELTA_NLL_TITLE], "degradation": [charts.DELTA_NLL_TITLE, "σ (units of rms(W))"],
    "layer_profile": [charts.DELTA_NLL_TITLE], "dose_response": ["log–log slope"], "critical_layers": [charts.DELTA_NLL_TITLE, charts.DEPTH_TITLE],
    "seed_consistency": ["Spearman ρ"], "architecture": [charts.DELTA_NLL_TITLE, charts.DEPTH_TITLE],
    "moe_routing": ["fraction"], "importance": ["log10(importance score)"], "validation": [charts.DELTA_NLL_TITLE],
    "prediction": ["predicted " + charts.DELTA_NLL_TITLE, "measured " + charts.DELTA_NLL_TITLE],
}  # fmt: skip


def walk(spec):
    """Every dict nested in a Vega-Lite spec."""
    if isinstance(spec, dict):
        yield spec
        for value in spec.values():
            yield from walk(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from walk(value)


def marks_and_fields(spec: dict) -> tuple[set[str], set[str], set[str]]:
    marks, fields, titles = set(), set(), set()
    for node in walk({k: v for k, v in spec.items() if k != "datasets"}):
        mark = node.get("mark")
        if mark is not None:
            marks.add(mark if isinstance(mark, str) else mark["type"])
        if "field" in node:
            fields.add(node["field"])
        if isinstance(node.get("title"), str):
            titles.add(node["title"])
    return marks, fields, titles


def title_text(spec: dict) -> str:
    """Title, subtitle and caption lines of a chart from charts.* (a one-chart vconcat with a bottom caption)."""
    lines = []
    for title in (spec["vconcat"][0]["title"], spec.get("title")):
        for key in ("text", "subtitle"):
            value = (title or {}).get(key) or []
            lines.extend([value] if isinstance(value, str) else value)
    return " | ".join(lines)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chart_renders_to_a_labelled_png(name, relations):
    chart = build(name, relations)
    spec = chart.to_dict()
    marks, fields, axis_titles = marks_and_fields(spec)
    want_marks, want_fields, title_words = EXPECTED[name]
    assert want_marks <= marks, f"{name}: marks {marks}"
    assert want_fields <= fields, f"{name}: fields {fields}"
    for axis_title in AXIS_TITLES[name]:
        assert any(axis_title in t for t in axis_titles), f"{name}: no axis title with {axis_title!r} in {axis_titles}"
    for word in title_words:
        assert word in title_text(spec), f"{name}: {word!r} not in title {title_text(spec)!r}"

    png = charts.to_png(chart)
    width, height = charts.png_size(png)
    assert len(png) > 8_000, f"{name}: PNG of {len(png)} bytes looks empty"
    assert 400 <= width <= 5_000 and 250 <= height <= 5_000, f"{name}: {width}x{height}"


# relations whose analysis drops random-weight models (issue 10 item 12): their charts never show them
NO_RANDOM_MODELS = {"architecture", "critical_layers"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_random_weight_models_are_labelled_and_pretrained_ones_are_not(name, relations):
    if name in NO_RANDOM_MODELS:  # the analysis leaves random-weight models out: nothing to label
        assert "tiny-mixtral" not in json.dumps(build(name, relations).to_dict())
        return
    assert charts.PLUMBING_NOTE in title_text(build(name, relations).to_dict())
    if name == "moe_routing":  # only the tiny MoE model has routing rows
        return
    pretrained = {key: frame.loc[frame["model"] == "smollm2-135m"] if "model" in frame.columns else frame
                  for key, frame in relations.items()}  # fmt: skip
    assert charts.PLUMBING_NOTE not in title_text(build(name, pretrained).to_dict())


def test_random_weight_label_falls_back_to_the_tiny_prefix_without_models(relations):
    significance = relations["significance"]
    assert charts.PLUMBING_NOTE in title_text(charts.sensitivity_heatmap(significance).to_dict())
    mislabelled = relations["models"].assign(random_weights=False)
    assert charts.PLUMBING_NOTE not in title_text(charts.sensitivity_heatmap(significance, models=mislabelled).to_dict())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_empty_input_raises_instead_of_an_empty_chart(name, relations):
    empty = {key: frame.iloc[0:0] for key, frame in relations.items()}
    with pytest.raises(ValueError, match="no rows"):
        build(name, empty)


def test_missing_column_is_named(relations):
    with pytest.raises(ValueError, match=r"\['mean_delta_nll'\]"):
        charts.sensitivity_heatmap(relations["significance"].drop(columns="mean_delta_nll"))


def test_heatmap_marks_exactly_the_bh_significant_cells(relations):
    significance = relations["significance"]
    spec = charts.sensitivity_heatmap(significance).to_dict()
    (data,) = spec["datasets"].values()
    plotted = pd.DataFrame(data)
    assert len(plotted) == len(significance)
    assert plotted["significant"].sum() == significance["significant_bh"].sum()
    assert 0 < plotted["significant"].sum() < len(plotted)
    dots = [n for n in walk(spec) if n.get("mark", {}) == {"type": "point", "filled": True, "size": 28,
                                                              "color": "black", "stroke": "white",
                                                              "strokeWidth": 0.6}]  # fmt: skip
    assert dots and dots[0]["transform"] == [{"filter": "(datum.marker_label !== '')"}]
    assert set(plotted.loc[plotted["significant"], "marker_label"]) == {SIGNIFICANT_LABEL}


def test_heatmap_marks_untestable_cells_apart_from_not_significant(relations):
    """'Not significant' is never a stand-in for 'could not test': a NULL flag gets its own mark."""
    significance = relations["significance"].copy()
    pretrained = significance["model"] == "smollm2-135m"
    untestable = significance.index[pretrained & ~significance["significant_bh"].astype(bool)][:3]
    tested_not_significant = significance.index[pretrained & ~significance["significant_bh"].astype(bool)][3:]
    significance["significant_bh"] = significance["significant_bh"].astype(object)
    significance.loc[untestable, "significant_bh"] = None
    spec = charts.sensitivity_heatmap(significance).to_dict()
    plotted = pd.DataFrame(next(iter(spec["datasets"].values())))
    assert (plotted["marker_label"] == UNTESTED_LABEL).sum() == 3
    assert (plotted["marker_label"] == "").sum() == len(tested_not_significant) + int(
        (~pretrained & ~relations["significance"]["significant_bh"].astype(bool)).sum())
    shapes = [n["encoding"]["shape"]["scale"] for n in walk(spec) if "shape" in n.get("encoding", {})]
    assert {"domain": [SIGNIFICANT_LABEL, UNTESTED_LABEL], "range": ["circle", "cross"]} in shapes
    charts.to_png(charts.sensitivity_heatmap(significance))  # renders (vl-convert) with both marks


def test_moe_single_expert_rows_do_not_double_the_cells(relations):
    significance = relations["significance"]
    moe = significance.loc[significance["model"] == "tiny-mixtral"]
    expert_rows = pd.concat([moe.assign(expert=e, mean_delta_nll=moe["mean_delta_nll"] + 100) for e in (0, 1)])
    mixed = pd.concat([significance, expert_rows], ignore_index=True)
    plotted = pd.DataFrame(next(iter(charts.sensitivity_heatmap(mixed).to_dict()["datasets"].values())))
    assert len(plotted) == len(significance)  # the all-experts row is the measurement
    assert plotted["mean_delta_nll"].max() == pytest.approx(significance["mean_delta_nll"].max())
    only_experts = pd.concat([significance.loc[significance["model"] != "tiny-mixtral"], expert_rows])
    plotted = pd.DataFrame(next(iter(charts.sensitivity_heatmap(only_experts).to_dict()["datasets"].values())))
    assert len(plotted) == len(significance)  # per-expert cells averaged into one


def test_degradation_from_sensitivity_bands_span_the_seeds(relations):
    sensitivity = relations["sensitivity"].loc[relations["sensitivity"]["model"] == "smollm2-135m"]
    spec = charts.degradation_curves(sensitivity, layer=2).to_dict()
    curves = pd.DataFrame(next(iter(spec["datasets"].values())))
    row = curves.loc[(curves["component"] == "ffn.down") & (curves["strength"] == 0.1)].iloc[0]
    seeds = sensitivity.loc[(sensitivity["component"] == "ffn.down") & (sensitivity["strength"] == 0.1)
                            & (sensitivity["layer"] == 2), "delta_nll"]  # fmt: skip
    assert row["low"] == pytest.approx(seeds.min()) and row["high"] == pytest.approx(seeds.max())
    assert row["value"] == pytest.approx(seeds.mean())
    log_axes = [n["scale"] for n in walk(spec) if n.get("field") == "strength" and "scale" in n]
    assert log_axes and all(s == {"type": "log"} for s in log_axes)


def test_ppl_ratio_curves_are_the_exponential_of_delta_nll(relations):
    significance = relations["significance"]
    nll = pd.DataFrame(next(iter(charts.degradation_curves(significance).to_dict()["datasets"].values())))
    ratio = pd.DataFrame(next(iter(charts.degradation_curves(significance, metric="ppl_ratio").to_dict()["datasets"].values())))
    assert np.allclose(ratio["value"], np.exp(nll["value"]))
    assert charts.DELTA_NLL_TITLE not in json.dumps(charts.degradation_curves(significance, metric="ppl_ratio").to_dict())


def test_several_kinds_need_an_explicit_choice(relations):
    significance = relations["significance"]
    mixed = pd.concat([significance.assign(kind="scale"), significance.assign(kind="neurons")])
    with pytest.raises(ValueError, match="pass kind="):
        charts.sensitivity_heatmap(mixed)
    assert "scale factor" in title_text(charts.sensitivity_heatmap(mixed, kind="scale").to_dict())


def test_scaling_chart_draws_the_stored_fit_with_r2_and_warnings(scaling_relations):
    rel = scaling_relations
    fit = rel["scaling_fit"].query("component == 'ffn.down' and strength == 0.1 and param_basis == 'total' "
                                   "and family == 'llama'").iloc[0]
    assert np.isfinite(fit["exponent"]) and fit["models"] == "smollm2-135m;llama-3.2-1b;llama-3.1-8b"
    chart = charts.scaling_chart(rel["scaling_fit"], rel["sensitivity"], rel["models"], component="ffn.down")
    spec = chart.to_dict()
    text = title_text(spec)
    assert f"R² = {fit['r2']:.3f}" in text and f"exponent {fit['exponent']:.3g}" in text
    assert "warning: " in text and "random-weight models left out" in text  # the fit's own warning
    assert charts.PLUMBING_NOTE not in text and "family llama" in text  # only pretrained llama models drawn
    frames = [pd.DataFrame(rows) for rows in spec["datasets"].values()]
    line = next(f for f in frames if "fitted" in f.columns)
    expected = np.exp(fit["intercept"]) * line["params"] ** fit["exponent"]
    assert np.allclose(line["fitted"], expected, rtol=1e-9)
    points = next(f for f in frames if "model" in f.columns)
    assert sorted(points["model"]) == sorted(fit["models"].split(";"))
    png = charts.to_png(chart)
    assert len(png) > 8_000


def test_scaling_chart_without_a_fit_shows_points_and_says_why(relations):
    fit = relations["scaling_fit"]  # two models: no fit possible
    chart = charts.scaling_chart(fit, relations["sensitivity"], relations["models"], component="ffn.down")
    text = title_text(chart.to_dict())
    assert "no fit drawn (not enough models)" in text and "at least 3 pretrained models of one family" in text


def test_png_markdown_embeds_the_png_and_html_is_offline(relations):
    chart = build("prediction", relations)
    png = charts.to_png(chart, scale=1)
    markdown = charts.png_markdown(png, alt_text="prediction [check]")
    assert markdown.startswith("![prediction (check)](data:image/png;base64,")
    assert base64.b64decode(markdown.split(",", 1)[1].rstrip(")")) == png
    html = charts.to_html(chart)
    assert "<script src=\"http" not in html and "vega" in html.lower() and len(html) > 100_000
    with pytest.raises(ValueError, match="not a PNG"):
        charts.png_markdown(b"GIF89a")


def test_heatmap_gives_each_model_its_own_layers_components_and_colour_range(relations):
    """A 4-layer model must not inherit a 30-layer model's rows, nor its colour range."""
    significance = relations["significance"]
    spec = charts.sensitivity_heatmap(significance, models=relations["models"]).to_dict()
    rows = spec["vconcat"][0]["vconcat"]
    assert len(rows) == significance["model"].nunique()
    assert all(spec["vconcat"][0]["resolve"]["scale"][ch] == "independent" for ch in ("x", "y", "color"))
    for row in rows:
        (model_filter,) = [t["filter"] for t in row["spec"]["transform"]]
        model = model_filter.split("'")[1]
        own = significance.loc[(significance["model"] == model) & (significance["kind"] == "gaussian")]
        encoding = row["spec"]["layer"][0]["encoding"]
        assert encoding["y"]["sort"] == [str(v) for v in sorted(own["layer"].dropna().astype(int).unique())]
        assert encoding["x"]["sort"] == sorted(own["component"].unique())
        limit = encoding["color"]["scale"]["domain"][1]
        assert limit == pytest.approx(own["mean_delta_nll"].abs().max())


def test_validation_marks_an_overflowed_loss_instead_of_dropping_its_bar(relations):
    """bit_flip on top weights can overflow the loss: that is the largest effect, so it must stay visible."""
    validation = relations["importance_validation"].copy()
    top = (validation["selection"] == "top") & (validation["model"] == "smollm2-135m") & (validation["kind"] == "zero")
    validation.loc[top, "delta_nll"] = np.inf
    spec = charts.importance_validation_chart(validation, kind="zero", models=relations["models"]).to_dict()
    plotted = pd.concat([pd.DataFrame(rows) for rows in spec["datasets"].values()], ignore_index=True)
    flagged = plotted.loc[plotted["role"] == "nonfinite"]
    assert set(flagged["selection"]) == {"top"} and set(flagged["model"]) == {"smollm2-135m"}
    assert len(flagged) == validation.loc[top].groupby(["metric", "k"]).ngroups
    assert any(n.get("mark", {}).get("text") == "∞" for n in walk(spec))
    assert "inf/NaN" in json.dumps(spec)


def test_norm_gain_factors_get_a_linear_strength_axis(relations):
    """Factors 0.9 and 1.1 nearly coincide on a log axis; σ spans decades and keeps it."""
    significance = relations["significance"]
    spec = charts.degradation_curves(significance.assign(strength=significance["strength"] + 0.9), kind=None).to_dict()
    scale_spec = charts.degradation_curves(significance.assign(kind="scale", strength=significance["strength"] + 0.9),
                                           kind="scale").to_dict()  # fmt: skip
    scales = [n["scale"]["type"] for n in walk(scale_spec) if n.get("field") == "strength" and "scale" in n]
    assert scales and set(scales) == {"linear"}
    assert {n["scale"]["type"] for n in walk(spec) if n.get("field") == "strength" and "scale" in n} == {"log"}


def test_prediction_chart_leaves_out_points_below_the_noise_floor(relations):
    prediction = relations["prediction_check"].assign(below_noise_floor=False)
    prediction.loc[prediction.index[:3], "below_noise_floor"] = True
    spec = charts.prediction_chart(prediction, models=relations["models"]).to_dict()
    plotted = pd.concat([pd.DataFrame(rows) for rows in spec["datasets"].values()], ignore_index=True)
    points = plotted.dropna(subset=["component"]).drop_duplicates(["model", "component", "layer", "strength"])
    assert len(points) == len(prediction) - 3
    assert "3 point(s) below the evaluation noise floor not shown" in json.dumps(spec)
