"""significance(): the paired window test, multiple-testing control and the edge cases users will hit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from esa_pipeline.core.analysis import SIGNIFICANCE_COLUMNS, significance
from esa_pipeline.core.analysis.significance import (
    NOTE_ALL_ZERO,
    NOTE_FEW_CLUSTERS,
    NOTE_NO_WINDOWS,
    NOTE_ONE_SEED,
    TEST_ACROSS_DRAWS,
    TEST_DETERMINISTIC,
    adjust_p_values,
    holm_adjusted,
)


def window_rows(deltas: np.ndarray, tokens: np.ndarray | int = 100, **cell) -> pd.DataFrame:
    """sensitivity_windows rows of one cell; deltas[seed, window] is the per-token ΔNLL of that window."""
    n_seeds, n_windows = deltas.shape
    tokens = np.broadcast_to(np.asarray(tokens, dtype=float), (n_windows,))
    spec = {
        "model": "m",
        "dataset": "bundled",
        "kind": "gaussian",
        "component": "ffn.down",
        "layer": 0,
        "expert": None,
        "strength": 0.1,
        **cell,
    }
    return pd.DataFrame(
        {
            **{k: [v] * deltas.size for k, v in spec.items()},
            "seed": np.repeat(np.arange(n_seeds), n_windows),
            "window_id": np.tile(np.arange(n_windows), n_seeds),
            "nll_sum": np.tile(tokens * 3.0, n_seeds),
            "n_tokens": np.tile(tokens, n_seeds),
            "delta_nll_sum": (deltas * tokens).ravel(),
        }
    )


def one_row(result: pd.DataFrame, **where) -> pd.Series:
    mask = (
        np.logical_and.reduce([result[k] == v for k, v in where.items()])
        if where
        else np.ones(len(result), bool)
    )
    assert mask.sum() == 1, result
    return result.loc[mask].iloc[0]


def test_conditional_test_with_equal_windows_is_scipys_one_sample_t_test_on_seed_averaged_differences() -> None:
    rng = np.random.default_rng(1)
    deltas = 0.05 + rng.normal(0, 0.1, size=(3, 12))  # [seeds, windows]
    result = significance(window_rows(deltas), alpha=0.05)
    assert list(result.columns) == SIGNIFICANCE_COLUMNS
    row = one_row(result)
    assert row["cluster_unit"] == "window" and row["n_clusters"] == 12  # no doc_id: each window a cluster
    per_window = deltas.mean(axis=0)
    expected = stats.ttest_1samp(per_window, 0.0)
    ci = expected.confidence_interval(0.95)
    assert row["conditional_t_stat"] == pytest.approx(expected.statistic, rel=1e-10)
    assert row["conditional_p_value"] == pytest.approx(expected.pvalue, rel=1e-10)
    assert (row["conditional_ci_low"], row["conditional_ci_high"]) == (
        pytest.approx(ci.low, rel=1e-10),
        pytest.approx(ci.high, rel=1e-10),
    )
    assert row["effect_size"] == pytest.approx(per_window.mean() / per_window.std(ddof=1), rel=1e-10)
    assert (row["n_seeds"], row["n_windows"]) == (3, 12)
    seed_means = deltas.mean(axis=1)
    assert row["seed_sd"] == pytest.approx(seed_means.std(ddof=1))
    assert (row["seed_min"], row["seed_max"]) == (
        pytest.approx(seed_means.min()),
        pytest.approx(seed_means.max()),
    )


def test_mean_is_token_weighted_like_the_sensitivity_relation() -> None:
    tokens = np.array([512, 512, 512, 37])  # a short last window must count by its tokens, not as a full vote
    deltas = np.array([[0.1, 0.1, 0.1, 2.0], [0.3, 0.3, 0.3, 4.0]])
    row = one_row(significance(window_rows(deltas, tokens)))
    per_seed = (deltas * tokens).sum(axis=1) / tokens.sum()  # what `sensitivity.delta_nll` holds per seed
    assert row["mean_delta_nll"] == pytest.approx(per_seed.mean())
    assert row["ci_low"] < row["mean_delta_nll"] < row["ci_high"]
    assert row["conditional_ci_low"] < row["mean_delta_nll"] < row["conditional_ci_high"]


def sweep_with_planted_effects(
    n_sweeps: int, n_cells: int, n_planted: int, rng
) -> tuple[pd.DataFrame, np.ndarray]:
    """n_sweeps models, each a sweep of n_cells cells (layers) × 10 windows of unequal length, 1 seed."""
    n_windows = 10
    tokens = rng.integers(64, 512, size=(n_sweeps, n_cells, n_windows)).astype(float)
    planted = np.zeros((n_sweeps, n_cells), bool)
    planted[:, :n_planted] = True
    effect = np.where(planted, 0.1, 0.0)[..., None]  # per-token ΔNLL
    per_token_noise = rng.normal(0, 1, tokens.shape) / np.sqrt(tokens)  # window noise shrinks with its length
    delta_sum = tokens * (effect + per_token_noise)
    frame = pd.DataFrame(
        {
            "model": np.repeat([f"sweep{i}" for i in range(n_sweeps)], n_cells * n_windows),
            "kind": "gaussian",
            "component": "ffn.down",
            "layer": np.tile(np.repeat(np.arange(n_cells), n_windows), n_sweeps),
            "expert": pd.array([pd.NA] * tokens.size, dtype="Int64"),
            "strength": 0.1,
            "seed": 0,
            "window_id": np.tile(np.arange(n_windows), n_sweeps * n_cells),
            "n_tokens": tokens.ravel(),
            "delta_nll_sum": delta_sum.ravel(),
        }
    )
    return frame, planted


def test_bh_controls_fdr_holm_controls_fwer_and_planted_effects_are_found() -> None:
    rng = np.random.default_rng(7)
    n_sweeps, n_cells, n_planted = 200, 100, 20
    frame, planted = sweep_with_planted_effects(n_sweeps, n_cells, n_planted, rng)
    result = significance(frame, alpha=0.05).sort_values(["model", "layer"], key=_natural)
    is_planted = planted.ravel()
    # one seed: no across-draw test (NULL), the conditional window test is the one to check
    assert result["p_value"].isna().all() and result["significant_bh"].isna().all()
    assert (result["note"] == NOTE_ONE_SEED).all()
    p_bh = result["conditional_p_bh"].to_numpy().reshape(n_sweeps, n_cells)
    p_holm = result["conditional_p_holm"].to_numpy().reshape(n_sweeps, n_cells)
    p_raw = result["conditional_p_value"].to_numpy()

    # the window test is calibrated: nulls reject at the nominal 5% (16,000 null cells, MC sd 0.0017)
    assert 0.04 <= (p_raw[~is_planted] < 0.05).mean() <= 0.06
    discoveries = p_bh <= 0.10
    false_discoveries = discoveries & ~planted
    fdp = false_discoveries.sum(axis=1) / np.maximum(discoveries.sum(axis=1), 1)
    assert fdp.mean() <= 0.10 + 3 * fdp.std(ddof=1) / np.sqrt(n_sweeps)
    any_false_holm = ((p_holm <= 0.05) & ~planted).any(axis=1)
    assert any_false_holm.mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / n_sweeps)
    assert (p_bh[planted] <= 0.10).mean() >= 0.9  # planted effects are found
    significant = result["conditional_significant_bh"].to_numpy(dtype=bool)
    assert (significant == (result["conditional_p_bh"].to_numpy() <= 0.05)).all()


def _natural(column: pd.Series) -> pd.Series:
    return column.str.replace("sweep", "").astype(int) if column.name == "model" else column


def test_correction_runs_across_each_models_whole_sweep_and_not_across_models() -> None:
    rng = np.random.default_rng(3)
    frames = [
        window_rows(rng.normal(mu, 0.1, size=(1, 8)), model=model, kind=kind, strength=strength, layer=layer)
        for model in ("a", "b")
        for kind, strength in (("gaussian", 0.01), ("gaussian", 0.1), ("scale", 1.1))
        for layer, mu in ((0, 0.0), (1, 0.08))
    ]
    result = significance(pd.concat(frames, ignore_index=True))
    for _, rows in result.groupby("model"):
        assert len(rows) == 6
        _, expected_holm, _, _ = multipletests(rows["conditional_p_value"], method="holm")
        _, expected_bh, _, _ = multipletests(rows["conditional_p_value"], method="fdr_bh")
        np.testing.assert_allclose(rows["conditional_p_holm"], expected_holm)
        np.testing.assert_allclose(rows["conditional_p_bh"], expected_bh)


def test_holm_adjustment_equals_statsmodels_including_ties_and_large_p() -> None:
    rng = np.random.default_rng(8)
    p = np.concatenate([rng.uniform(0, 1, 40), rng.uniform(0, 0.01, 10), [0.02, 0.02, 0.02, 1.0, 0.0]])
    np.testing.assert_allclose(holm_adjusted(p), multipletests(p, method="holm")[1])


def test_nonfinite_window_gives_nan_p_with_a_note_and_stays_out_of_the_correction() -> None:
    rng = np.random.default_rng(4)
    broken = rng.normal(0.5, 0.1, size=(2, 6))
    broken[1, 2] = np.inf  # one seed's window overflowed
    nan_cell = rng.normal(0.5, 0.1, size=(2, 6))
    nan_cell[0, 0] = np.nan
    frames = [window_rows(broken, layer=0), window_rows(nan_cell, layer=1)]
    frames += [window_rows(rng.normal(0.02, 0.1, size=(2, 6)), layer=layer) for layer in (2, 3, 4)]
    result = significance(pd.concat(frames, ignore_index=True))
    inf_row, nan_row = one_row(result, layer=0), one_row(result, layer=1)
    assert inf_row["mean_delta_nll"] == np.inf
    assert np.isnan(nan_row["mean_delta_nll"])
    for row in (inf_row, nan_row):
        assert np.isnan(row["p_value"]) and np.isnan(row["p_holm"]) and np.isnan(row["p_bh"])
        assert np.isnan(row["conditional_p_value"]) and pd.isna(row["test_used"])
        # untested is not "not significant": the flags are NULL, the note says why
        assert pd.isna(row["significant_holm"]) and pd.isna(row["significant_bh"])
        assert pd.isna(row["conditional_significant_bh"])
        assert "non-finite ΔNLL in 1 of 6 windows" in row["note"] and "most sensitive" in row["note"]
    assert inf_row["seed_max"] == np.inf and np.isnan(nan_row["seed_sd"])  # a NaN seed is not averaged away
    tested = result.loc[result["layer"] >= 2]
    _, expected_holm, _, _ = multipletests(tested["p_value"], method="holm")  # family of the 3 finite cells
    np.testing.assert_allclose(tested["p_holm"], expected_holm)
    assert (tested["note"] == "").all() and (tested["test_used"] == TEST_ACROSS_DRAWS).all()
    assert tested["significant_bh"].notna().all()


def test_fewer_than_two_windows_and_all_zero_cells_are_reported_not_crashed() -> None:
    frames = [window_rows(np.array([[0.3], [0.4]]), layer=0), window_rows(np.zeros((3, 5)), layer=1)]
    result = significance(pd.concat(frames, ignore_index=True))
    single = one_row(result, layer=0)
    assert np.isnan(single["p_value"]) and single["note"] == NOTE_FEW_CLUSTERS.format(unit="window")
    assert pd.isna(single["significant_bh"])
    assert single["mean_delta_nll"] == pytest.approx(0.35)
    zero = one_row(result, layer=1)
    assert zero["p_value"] == 1.0 and zero["t_stat"] == 0.0 and zero["note"] == NOTE_ALL_ZERO
    assert zero["conditional_p_value"] == 1.0 and not zero["significant_bh"]


def test_sensitivity_gives_seed_spread_and_rows_for_cells_without_windows() -> None:
    rng = np.random.default_rng(5)
    windows = window_rows(rng.normal(0.2, 0.05, size=(3, 6)), layer=0)
    sensitivity = pd.DataFrame(
        {
            "model": "m",
            "kind": "gaussian",
            "component": "ffn.down",
            "layer": [0, 0, 0, 1],
            "expert": None,
            "strength": 0.1,
            "seed": [0, 1, 2, 0],
            "delta_nll": [0.1, 0.2, 0.6, 0.9],
        }
    )
    result = significance(windows, sensitivity)
    measured = one_row(result, layer=0)
    assert measured["seed_sd"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert (measured["seed_min"], measured["seed_max"], measured["n_seeds"]) == (0.1, 0.6, 3)
    missing = one_row(result, layer=1)
    assert missing["note"] == NOTE_NO_WINDOWS and np.isnan(missing["p_value"]) and missing["n_windows"] == 0
    assert missing["mean_delta_nll"] == 0.9 and missing["n_seeds"] == 1


def test_empty_sweep_gives_an_empty_frame_with_the_contract_columns() -> None:
    empty = window_rows(np.ones((1, 2))).iloc[:0]
    result = significance(empty)
    assert result.empty and list(result.columns) == SIGNIFICANCE_COLUMNS


def test_moe_expert_rows_stay_separate_cells() -> None:
    rng = np.random.default_rng(6)
    frames = [window_rows(rng.normal(0.1, 0.1, size=(2, 4)), expert=e) for e in (None, 0, 1)]
    result = significance(pd.concat(frames, ignore_index=True))
    assert result["expert"].dtype == "Int64"
    assert result["expert"].isna().sum() == 1 and sorted(result["expert"].dropna()) == [0, 1]


def test_bad_input_raises_errors_that_name_the_fix() -> None:
    rows = window_rows(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\['delta_nll_sum'\]"):
        significance(rows.drop(columns="delta_nll_sum"))
    with pytest.raises(ValueError, match="one dataset"):
        significance(pd.concat([rows, rows.assign(dataset="wikitext-103")], ignore_index=True))
    with pytest.raises(ValueError, match="drop the duplicates"):
        significance(pd.concat([rows, rows], ignore_index=True))
    with pytest.raises(ValueError, match="alpha"):
        significance(rows, alpha=5)


def test_untested_p_value_gives_a_null_flag_not_false() -> None:
    adjusted = adjust_p_values(np.array([0.01, 0.04, np.nan, 0.2]), alpha=0.05)
    # BH over the 3 tested p-values: 0.01·3/1, 0.04·3/2, 0.2·3/3
    np.testing.assert_allclose(adjusted["p_bh"], [0.03, 0.06, np.nan, 0.2])
    np.testing.assert_allclose(adjusted["p_holm"], [0.03, 0.08, np.nan, 0.2])
    assert adjusted["significant_bh"].tolist() == [True, False, pd.NA, False]
    assert adjusted["significant_holm"].tolist() == [True, False, pd.NA, False]


def documents_frame(deltas: np.ndarray, doc_of_window: np.ndarray, tokens: np.ndarray, **cell) -> pd.DataFrame:
    frame = window_rows(deltas, tokens, **cell)
    frame["doc_id"] = np.tile(doc_of_window, deltas.shape[0])
    return frame


def test_clustered_se_equals_statsmodels_cluster_robust_weighted_mean() -> None:
    import statsmodels.api as sm

    rng = np.random.default_rng(11)
    n_docs, per_doc = 8, 3
    doc_of_window = np.repeat(np.arange(n_docs), per_doc)
    doc_effect = rng.normal(0, 0.2, n_docs)[doc_of_window]  # windows of one document move together
    deltas = 0.1 + doc_effect + rng.normal(0, 0.05, size=(1, n_docs * per_doc))
    tokens = rng.integers(100, 400, n_docs * per_doc).astype(float)
    row = one_row(significance(documents_frame(deltas, doc_of_window, tokens)))
    assert row["cluster_unit"] == "document" and row["n_clusters"] == n_docs and row["n_windows"] == 24
    # reference: WLS of per-token ΔNLL on a constant, weights = tokens, CR1 errors clustered by document
    fit = sm.WLS(deltas[0], np.ones((24, 1)), weights=tokens).fit(
        cov_type="cluster", cov_kwds={"groups": doc_of_window}
    )
    assert row["mean_delta_nll"] == pytest.approx(fit.params[0], rel=1e-12)
    se = (row["conditional_ci_high"] - row["conditional_ci_low"]) / (2 * stats.t.ppf(0.975, n_docs - 1))
    assert se == pytest.approx(fit.bse[0], rel=1e-10)
    assert row["conditional_t_stat"] == pytest.approx(fit.params[0] / fit.bse[0], rel=1e-10)
    assert row["conditional_p_value"] == pytest.approx(2 * stats.t.sf(abs(fit.tvalues[0]), n_docs - 1), rel=1e-9)
    # treating the 24 windows as independent would understate the SE here
    naive = one_row(significance(window_rows(deltas, tokens)))
    assert naive["conditional_ci_high"] - naive["conditional_ci_low"] < row["conditional_ci_high"] - row["conditional_ci_low"]


def test_across_draw_se_is_the_two_way_anova_estimate_by_hand() -> None:
    rng = np.random.default_rng(12)
    n_seeds, n_docs = 3, 7
    y = 0.2 + rng.normal(0, 0.05, (n_seeds, 1)) + rng.normal(0, 0.1, (1, n_docs)) + rng.normal(0, 0.02, (n_seeds, n_docs))
    row = one_row(significance(documents_frame(y, np.arange(n_docs), np.full(n_docs, 128.0))))
    assert row["test_used"] == TEST_ACROSS_DRAWS
    grand = y.mean()
    ms_a = n_docs * ((y.mean(1) - grand) ** 2).sum() / (n_seeds - 1)
    ms_b = n_seeds * ((y.mean(0) - grand) ** 2).sum() / (n_docs - 1)
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + grand
    ms_e = (resid**2).sum() / ((n_seeds - 1) * (n_docs - 1))
    assert ms_a > ms_e and ms_b > ms_e  # the untruncated case
    variance = (ms_a + ms_b - ms_e) / (n_seeds * n_docs)
    dof = (ms_a + ms_b - ms_e) ** 2 / (ms_a**2 / 2 + ms_b**2 / 6 + ms_e**2 / 12)  # Satterthwaite
    assert row["mean_delta_nll"] == pytest.approx(grand)
    assert row["dof"] == pytest.approx(dof)
    assert row["t_stat"] == pytest.approx(grand / np.sqrt(variance))
    half = stats.t.ppf(0.975, dof) * np.sqrt(variance)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(grand - half), pytest.approx(grand + half))
    assert row["sigma_draw"] == pytest.approx(np.sqrt((ms_a - ms_e) / n_docs))


def test_across_draw_interval_covers_the_draw_population_mean_and_the_conditional_one_does_not() -> None:
    rng = np.random.default_rng(13)
    n_cells, n_seeds, n_docs, mu = 400, 3, 20, 0.1
    frames = []
    for layer in range(n_cells):
        y = mu + rng.normal(0, 0.05, (n_seeds, 1)) + rng.normal(0, 0.05, (1, n_docs))
        y = y + rng.normal(0, 0.02, (n_seeds, n_docs))
        frames.append(documents_frame(y, np.arange(n_docs), np.full(n_docs, 64.0), layer=layer))
    result = significance(pd.concat(frames, ignore_index=True))
    covered = (result["ci_low"] <= mu) & (mu <= result["ci_high"])
    conditional = (result["conditional_ci_low"] <= mu) & (mu <= result["conditional_ci_high"])
    # 400 cells: MC sd of a 95% coverage is 0.011
    assert 0.92 <= covered.mean() <= 0.985
    assert conditional.mean() < 0.8  # conditional on 3 draws, it cannot cover the draw population
    assert (result["test_used"] == TEST_ACROSS_DRAWS).all()


def test_deterministic_cells_use_the_clustered_test_and_one_seed_cells_stay_untested() -> None:
    rng = np.random.default_rng(14)
    deterministic = window_rows(rng.normal(0.3, 0.1, size=(1, 6)), kind="scale", strength=1.1)
    deterministic["seed"] = pd.array([pd.NA] * len(deterministic), dtype="Int64")
    one_seed = window_rows(rng.normal(0.3, 0.1, size=(1, 6)), layer=1)
    result = significance(pd.concat([deterministic, one_seed], ignore_index=True))
    fixed = one_row(result, kind="scale")
    assert fixed["test_used"] == TEST_DETERMINISTIC and fixed["n_seeds"] == 1
    assert fixed["p_value"] == fixed["conditional_p_value"] and bool(fixed["significant_bh"])
    assert "deterministic" in fixed["note"] and "not significant" not in fixed["note"]
    single = one_row(result, layer=1, kind="gaussian")
    assert np.isnan(single["p_value"]) and pd.isna(single["significant_bh"]) and single["note"] == NOTE_ONE_SEED
    assert single["conditional_p_value"] < 0.05


def test_deterministic_kinds_and_selections_are_never_across_draw_tested_and_settings_stay_separate() -> None:
    rng = np.random.default_rng(15)
    same = rng.normal(0.3, 0.1, size=(1, 6))
    scale = window_rows(np.repeat(same, 2, axis=0), kind="scale", strength=1.1)  # one setting measured per seed
    top = window_rows(rng.normal(0.3, 0.1, size=(2, 6)), kind="zero", strength=0.01).assign(selection="top")
    quant = pd.concat([window_rows(rng.normal(0.2, 0.1, size=(1, 6)), kind="quantize", strength=4.0).assign(
        group_size=g) for g in (0, 128)], ignore_index=True)  # fmt: skip
    result = significance(pd.concat([scale, top, quant], ignore_index=True))
    assert (result["test_used"] == TEST_DETERMINISTIC).all() and result["significant_bh"].notna().all()
    assert sorted(result.loc[result["kind"] == "quantize", "group_size"].tolist()) == [0, 128]
    assert one_row(result, kind="zero")["selection"] == "top"


def test_noise_on_top_neurons_is_seeded_and_gets_the_across_draw_test() -> None:
    # top/bottom neurons zeroed are seed-independent; noise on those neurons is drawn from the seed (two draws
    # differ), so that cell is stochastic and gets the across-draw test (issue 10 item 5)
    rng = np.random.default_rng(16)
    noise = window_rows(rng.normal(0.3, 0.1, size=(2, 6)), kind="neurons", strength=0.25).assign(
        selection="top", mode="noise")
    zeroed = window_rows(rng.normal(0.3, 0.1, size=(1, 6)), kind="neurons", strength=0.5).assign(
        selection="top", mode="zero")
    zeroed["seed"] = pd.array([pd.NA] * len(zeroed), dtype="Int64")
    result = significance(pd.concat([noise, zeroed], ignore_index=True))
    assert one_row(result, strength=0.25)["test_used"] == TEST_ACROSS_DRAWS
    assert one_row(result, strength=0.5)["test_used"] == TEST_DETERMINISTIC


def test_seeds_that_stopped_at_different_windows_get_the_across_draw_test_on_their_common_windows() -> None:
    """Adaptive budgets: seeds share one visit order and stop after their own number of windows. The headline
    test runs on the windows every seed scored (their common prefix) instead of being lost."""
    from esa_pipeline.core.analysis.significance import NOTE_UNBALANCED

    rng = np.random.default_rng(21)
    n_seeds, n_windows = 3, 12
    doc_of_window = np.arange(n_windows) // 2  # 6 documents of 2 windows
    y = 0.2 + rng.normal(0, 0.05, (n_seeds, 1)) + rng.normal(0, 0.1, (1, n_windows))
    full = documents_frame(y, doc_of_window, np.full(n_windows, 128.0))
    stopped = {0: 8, 1: 12, 2: 10}  # seed -> windows scored (visit order = window_id order here)
    adaptive = full.loc[full["window_id"] < full["seed"].map(stopped)]
    row = one_row(significance(adaptive))
    common = one_row(significance(full.loc[full["window_id"] < 8]))  # every seed on the first 8 windows
    assert row["test_used"] == TEST_ACROSS_DRAWS
    for column in ("t_stat", "dof", "p_value", "ci_low", "ci_high", "sigma_draw"):
        assert row[column] == pytest.approx(common[column], rel=1e-12), column
    assert "across-draw test on the 8 windows every seed scored (4 documents)" in row["note"]
    # the estimate and the conditional test keep every scored window
    assert row["n_windows"] == 12 and row["mean_delta_nll"] != pytest.approx(common["mean_delta_nll"])
    # common windows in one document only: no across-draw test, and the note says why
    one_doc = full.loc[full["window_id"] < full["seed"].map({0: 2, 1: 12, 2: 10})]
    row = one_row(significance(one_doc))
    assert pd.isna(row["p_value"]) and pd.isna(row["test_used"])
    assert NOTE_UNBALANCED.format(unit="document") in row["note"]
    assert row["conditional_p_value"] == row["conditional_p_value"]  # still tested, conditionally


def test_zero_variance_of_the_seed_average_does_not_claim_an_infinite_headline_t() -> None:
    # Two seeds, each constant over windows (0.3 and 0.5): the seed-averaged windows are identical (conditional
    # t infinite), but the across-draw headline has a finite t from the two draws. The note said "zero
    # variance, t is infinite" beside a finite headline t_stat.
    row = one_row(significance(window_rows(np.array([[0.3] * 5, [0.5] * 5]))))
    assert row["test_used"] == TEST_ACROSS_DRAWS and np.isfinite(row["t_stat"]) and row["p_value"] > 0.05
    assert row["note"] == "identical seed-averaged ΔNLL per token in every window: zero variance, the conditional " \
                          "t is infinite"
    assert row["conditional_p_value"] == 0.0
