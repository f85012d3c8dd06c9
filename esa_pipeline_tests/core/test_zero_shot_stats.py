"""Paired statistics of zero-shot accuracy on synthetic items with known answers."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esa_pipeline.core.analysis.zero_shot_stats import (
    NOTE_NO_DISCORDANT,
    mcnemar_exact_p,
    paired_difference_ci,
    task_vs_perplexity,
    zero_shot_summary,
)

SPEC = {"kind": "gaussian", "component": "ffn.down", "expert": None, "seed": 1, "mode": "noise",
        "selection": "random", "group_size": None}  # fmt: skip


def items(model: str, task: str, layer: int, strength: float, both: int, lost: int, gained: int,
          neither: int) -> pd.DataFrame:  # fmt: skip
    before = [True] * both + [True] * lost + [False] * gained + [False] * neither
    after = [True] * both + [False] * lost + [True] * gained + [False] * neither
    n = len(before)
    return pd.DataFrame({
        "model": model, "task": task, **SPEC, "layer": layer, "strength": strength,
        "item_id": [f"i{k}" for k in range(n)], "correct_before": before, "correct_after": after,
        "margin_before": np.where(before, 1.0, -1.0), "margin_after": np.where(after, 0.5, -0.5),
        "restored": True, "random_weights": False,
    })  # fmt: skip


def test_exact_mcnemar_is_the_two_sided_binomial_test_on_discordant_items() -> None:
    # 10 lost, 2 gained: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact_p(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact_p(2, 10) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)


def test_agresti_min_interval_by_hand() -> None:
    # n = 100: 80 both, 10 lost, 2 gained, 8 neither. Adjusted: lost 10.5, gained 2.5, n 102.
    low, high = paired_difference_ci(80, 10, 2, 8)
    diff = (2.5 - 10.5) / 102
    se = math.sqrt(13 - 8.0**2 / 102) / 102
    z = stats.norm.ppf(0.975)
    assert (low, high) == pytest.approx((diff - z * se, diff + z * se), rel=1e-12)
    assert (low, high) == pytest.approx((-0.146021, -0.010842), abs=1e-5)
    # no discordant items: a narrow interval around 0, not the degenerate [0, 0] of the plain Wald interval
    low, high = paired_difference_ci(50, 0, 0, 50)
    assert low < 0 < high and high - low < 0.05
    assert all(math.isnan(v) for v in paired_difference_ci(0, 0, 0, 0))


def test_summary_counts_accuracies_and_corrects_per_model() -> None:
    frame = pd.concat([
        items("m", "t", 0, 0.1, both=80, lost=10, gained=2, neither=8),   # p = 158/4096
        items("m", "t", 1, 0.1, both=90, lost=0, gained=0, neither=10),   # no change: p = 1
        items("m", "t", 2, 0.1, both=50, lost=30, gained=0, neither=20),  # p = 2 / 2**30
        items("other", "t", 0, 0.1, both=5, lost=1, gained=0, neither=4),
    ], ignore_index=True)  # fmt: skip
    out = zero_shot_summary(frame).set_index(["model", "layer"])
    first = out.loc[("m", 0)]
    assert (first.n_items, first.n_both, first.n_lost, first.n_gained, first.n_neither) == (100, 80, 10, 2, 8)
    assert first.accuracy_before == pytest.approx(0.90) and first.accuracy_after == pytest.approx(0.82)
    assert first.delta_accuracy == pytest.approx(-0.08)
    assert first.mcnemar_p == pytest.approx(158 / 4096)
    assert out.loc[("m", 1)].mcnemar_p == 1.0 and out.loc[("m", 1)].note == NOTE_NO_DISCORDANT
    # Holm over the model's three points: sorted p = (2^-29, 158/4096, 1) -> (3 * 2^-29, 2 * 158/4096, 1)
    assert out.loc[("m", 2)].p_holm == pytest.approx(3 * 2 / 2**30)
    assert first.p_holm == pytest.approx(2 * 158 / 4096)
    assert out.loc[("m", 1)].p_holm == 1.0
    # 0.039 alone, 0.077 after Holm: significant only uncorrected
    assert bool(out.loc[("m", 2)].significant_holm) and not bool(first.significant_holm)
    # BH: p_(2) * 3 / 2
    assert first.p_bh == pytest.approx(158 / 4096 * 3 / 2)
    # the other model is corrected on its own (one test: unchanged)
    assert out.loc[("other", 0)].p_holm == pytest.approx(out.loc[("other", 0)].mcnemar_p) == 1.0
    assert first.mean_margin_before == pytest.approx(0.8) and bool(first.restored)


def test_summary_flags_an_unrestored_point() -> None:
    frame = items("m", "t", 0, 0.1, 5, 1, 1, 3)
    frame["restored"] = frame["restored"].astype(object)
    frame.loc[0, "restored"] = None
    assert not bool(zero_shot_summary(frame)["restored"].iloc[0])


def test_summary_names_missing_columns() -> None:
    with pytest.raises(ValueError, match="correct_after"):
        zero_shot_summary(items("m", "t", 0, 0.1, 1, 1, 1, 1).drop(columns="correct_after"))


def _sensitivity(model: str, layers: list[int], delta_nll: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"model": model, **SPEC, "layer": layers, "strength": 0.1, "delta_nll": delta_nll})


def test_task_vs_perplexity_rank_correlation_and_disagreement() -> None:
    # five points: ΔNLL rises with layer; accuracy falls with layer except layer 4 (largest ΔNLL, no task change)
    lost = [0, 2, 4, 6, 0]
    frame = pd.concat([items("m", "t", layer, 0.1, both=20 - n, lost=n, gained=0, neither=0)
                       for layer, n in enumerate(lost)], ignore_index=True)  # fmt: skip
    summary = zero_shot_summary(frame)
    sens = _sensitivity("m", [0, 1, 2, 3, 4, 9], [0.01, 0.02, 0.03, 0.04, 0.50, 1.0])  # layer 9: no zero-shot point
    corr, points = task_vs_perplexity(summary, sens)
    row = corr.set_index("task").loc["t"]
    expected = stats.spearmanr([0.01, 0.02, 0.03, 0.04, 0.50], [0, -0.1, -0.2, -0.3, 0])
    assert row.n_points == 5 and row.spearman_rho == pytest.approx(expected.statistic)
    # 5 points: the exact permutation p (share of the 120 pairings with |rho| at least as large), not t's
    pairings = [abs(stats.spearmanr([0.01, 0.02, 0.03, 0.04, 0.50], [[0, -0.1, -0.2, -0.3, 0][i] for i in perm])
                    .statistic) for perm in itertools.permutations(range(5))]  # fmt: skip
    assert row.p_value == pytest.approx(np.mean(np.array(pairings) >= abs(expected.statistic) - 1e-12))
    assert row.ci_low < row.spearman_rho < row.ci_high
    top = points.loc[(points["task"] == "t") & (points["disagreement_rank"] == 1)].iloc[0]
    assert top.layer == 4 and top.direction == "perplexity_only"
    assert top.nll_rank_pct == 1.0 and top.disagreement == pytest.approx(1.0 - 1.5 / 5)
    # the pooled "all" row equals the single task here
    assert corr.set_index("task").loc["all"].spearman_rho == pytest.approx(row.spearman_rho)


def test_task_vs_perplexity_needs_enough_points_and_says_so() -> None:
    frame = pd.concat([items("m", "t", layer, 0.1, 5, layer, 0, 0) for layer in range(3)], ignore_index=True)
    corr, points = task_vs_perplexity(zero_shot_summary(frame), _sensitivity("m", [0, 1, 2], [0.3, 0.1, 0.2]))
    assert corr["spearman_rho"].isna().all() and corr["note"].str.contains(">= 4").all()
    # the ranks are stored, but 3 points claim no direction of disagreement
    assert set(points["direction"]) == {"not_ranked"} and points["disagreement"].abs().max() > 0


def test_constant_accuracy_is_not_a_correlation() -> None:
    frame = pd.concat([items("m", "t", layer, 0.1, 5, 0, 0, 5) for layer in range(5)], ignore_index=True)
    corr, points = task_vs_perplexity(zero_shot_summary(frame), _sensitivity("m", list(range(5)), [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert corr["spearman_rho"].isna().all() and corr["note"].str.contains("same at every point").all()
    # no task changed anywhere: no point "hurts perplexity more than tasks" by rank arithmetic alone
    assert set(points["direction"]) == {"not_ranked"}


def test_charts_draw_accuracy_and_disagreement(tmp_path) -> None:
    from esa_pipeline.core.reporting.charts import to_png
    from esa_pipeline.core.reporting.charts.zero_shot import (
        task_vs_perplexity_chart,
        zero_shot_accuracy_chart,
    )
    from esa_pipeline.core.reporting.report import build_report

    frame = pd.concat([items("smollm2-135m", "esa_knowledge", layer, 0.1, both=20 - n, lost=n, gained=0, neither=5)
                       for layer, n in enumerate([0, 2, 4, 6, 0])], ignore_index=True)  # fmt: skip
    summary = zero_shot_summary(frame)
    corr, points = task_vs_perplexity(summary, _sensitivity("smollm2-135m", [0, 1, 2, 3, 4], [0.01, 0.02, 0.03, 0.04, 0.5]))
    assert to_png(zero_shot_accuracy_chart(summary))[:4] == b"\x89PNG"
    spec = task_vs_perplexity_chart(points, corr).to_dict()
    assert "Spearman ρ = " in str(spec) and "perplexity_only" in str(spec)
    page = build_report({"zero_shot_significance": summary, "task_vs_perplexity": corr,
                         "task_vs_perplexity_points": points}, tmp_path, experiment={"name": "t"}).read_text()  # fmt: skip
    assert "Task accuracy under perturbation" in page and "zero_shot__disagreement.png" in page
    assert (tmp_path / "zero_shot__accuracy.png").is_file()


def test_task_vs_perplexity_joins_seed_independent_points_stored_with_seed_null() -> None:
    # norm scale is measured once (seed NULL) in the sweep and in zero-shot: the NULL seeds join (issue 10 item 5)
    lost = [0, 2, 4]
    frame = pd.concat([items("m", "t", layer, 1.1, both=20 - n, lost=n, gained=0, neither=0)
                       for layer, n in enumerate(lost)], ignore_index=True).assign(
        kind="scale", component="norm.input", seed=pd.NA)  # fmt: skip
    sens = _sensitivity("m", [0, 1, 2], [0.01, 0.02, 0.03]).assign(kind="scale", component="norm.input", seed=pd.NA,
                                                                  strength=1.1)  # fmt: skip
    corr, _ = task_vs_perplexity(zero_shot_summary(frame), sens)
    assert corr.set_index("task").loc["t"].n_points == 3


def test_accuracy_chart_panels_draw_only_their_own_tasks_rows() -> None:
    # Layers that carried their own data were not split by the task facet: every task's panel drew every task's
    # points (a real Gemma-3 run showed esa_reading's +0.33 in the esa_commonsense panel too).
    from esa_pipeline.core.reporting.charts.zero_shot import zero_shot_accuracy_chart

    frame = pd.concat([items("m", "t_lost", 0, 0.1, both=10, lost=8, gained=0, neither=2),
                       items("m", "t_same", 0, 0.1, both=10, lost=0, gained=0, neither=10)], ignore_index=True)  # fmt: skip
    spec = zero_shot_accuracy_chart(zero_shot_summary(frame)).to_dict()
    facets = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "facet" in node and "spec" in node:
                facets.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert len(facets) == 1 and facets[0]["facet"]["column"]["field"] == "task"
    # every layer inherits the faceted rows (its own data would be drawn unsplit in every panel)
    assert [layer.get("data") for layer in facets[0]["spec"]["layer"]] == [None, None, None]
    (rows,) = [rows for rows in spec["datasets"].values() if rows and "task" in rows[0]]
    assert sorted((r["task"], r["delta_accuracy"]) for r in rows) == [("t_lost", -0.4), ("t_same", 0.0)]


def test_points_off_the_sweep_keep_their_task_rows_with_the_reason() -> None:
    # a zero_shot.at grid whose points are not sweep points (e.g. a global component, or a strength the sweep
    # does not take) gave task_vs_perplexity no row at all: untested must be a NULL with its reason
    frame = pd.concat([items("m", task, layer, 0.1, 5, layer, 0, 0) for layer in range(2) for task in ("a", "b")],
                      ignore_index=True)  # fmt: skip
    corr, points = task_vs_perplexity(zero_shot_summary(frame), _sensitivity("m", [7, 8], [0.1, 0.2]))
    assert list(corr["task"]) == ["a", "all", "b"] and (corr["n_points"] == 0).all()
    assert corr["spearman_rho"].isna().all() and corr["note"].str.startswith("0 points measured both ways").all()
    assert points.empty


def test_point_labels_name_the_seed_only_when_the_point_has_one() -> None:
    from esa_pipeline.core.reporting.charts.zero_shot import point_labels

    points = pd.DataFrame({"kind": ["gaussian", "scale"], "component": ["ffn.down", "norm.input"],
                           "layer": pd.array([29, None], dtype="Int64"), "strength": [0.2, 0.9],
                           "seed": pd.array([1337, None], dtype="Int64")})  # fmt: skip
    assert point_labels(points).tolist() == ["gaussian ffn.down L29 s=0.2 #1337", "scale norm.input L— s=0.9"]


@pytest.mark.parametrize("overflow", [math.inf, math.nan])
def test_an_overflowed_point_ranks_as_the_largest_delta_nll_not_dropped(overflow) -> None:
    # top_delta_nll picks non-finite sweep points first, and task_vs_perplexity dropped them: n_points 4 of 5 and
    # no disagreement row for the most damaging point. An overflowed loss is the most sensitive outcome.
    lost = [0, 2, 4, 6, 10]
    frame = pd.concat([items("m", "t", layer, 0.1, both=20 - n, lost=n, gained=0, neither=0)
                       for layer, n in enumerate(lost)], ignore_index=True)  # fmt: skip
    sens = _sensitivity("m", [0, 1, 2, 3, 4], [0.01, 0.02, 0.03, 0.04, overflow])
    corr, points = task_vs_perplexity(zero_shot_summary(frame), sens)
    row = corr.set_index("task").loc["t"]
    expected = stats.spearmanr([1, 2, 3, 4, 5], [0, -0.1, -0.2, -0.3, -0.5])  # the overflow ranks last
    assert row.n_points == 5 and row.spearman_rho == pytest.approx(expected.statistic) == -1.0
    assert "1 point with non-finite ΔNLL (loss overflowed) ranked as the largest" in row.note
    worst = points.loc[(points["task"] == "t") & (points["layer"] == 4)].iloc[0]
    assert worst.nll_rank_pct == 1.0 and worst.task_rank_pct == 1.0 and worst.direction == "agree"
    assert worst.delta_nll != worst.delta_nll or worst.delta_nll == math.inf  # stored as measured
    from esa_pipeline.core.reporting.charts.zero_shot import task_vs_perplexity_chart

    spec = str(task_vs_perplexity_chart(points, corr).to_dict())  # the dot cannot be drawn: the title says so
    assert "n = 5 (1 point with non-finite ΔNLL (loss overflowed) ranked as the largest; not drawn)" in spec


def test_the_accuracy_chart_never_draws_an_untested_point_as_not_significant() -> None:
    from esa_pipeline.core.reporting.charts.zero_shot import zero_shot_accuracy_chart

    frame = pd.concat([items("m", "t", layer, 0.1, both=5, lost=layer, gained=0, neither=1) for layer in range(2)],
                      ignore_index=True)  # fmt: skip
    summary = zero_shot_summary(frame)
    summary.loc[1, ["mcnemar_p", "p_bh"]] = math.nan  # untested (e.g. no items)
    summary["significant_bh"] = summary["significant_bh"].astype("boolean")
    summary.loc[1, "significant_bh"] = pd.NA
    data = zero_shot_accuracy_chart(summary).to_dict()
    assert "not tested" in str(data)
    values = [row["significant"] for d in data["datasets"].values() for row in d]
    assert sorted(values) == ["no", "not tested"]
