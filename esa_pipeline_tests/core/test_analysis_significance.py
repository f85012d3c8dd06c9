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
    NOTE_FEW_WINDOWS,
    NOTE_NO_WINDOWS,
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


def test_equal_windows_reproduce_scipy_one_sample_t_test_on_seed_averaged_differences() -> None:
    rng = np.random.default_rng(1)
    deltas = 0.05 + rng.normal(0, 0.1, size=(3, 12))  # [seeds, windows]
    result = significance(window_rows(deltas), alpha=0.05)
    assert list(result.columns) == SIGNIFICANCE_COLUMNS
    row = one_row(result)
    per_window = deltas.mean(axis=0)
    expected = stats.ttest_1samp(per_window, 0.0)
    ci = expected.confidence_interval(0.95)
    assert row["t_stat"] == pytest.approx(expected.statistic, rel=1e-10)
    assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-10)
    assert (row["ci_low"], row["ci_high"]) == (
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
    p_bh = result["p_bh"].to_numpy().reshape(n_sweeps, n_cells)
    p_holm = result["p_holm"].to_numpy().reshape(n_sweeps, n_cells)
    p_raw = result["p_value"].to_numpy()

    # the window test is calibrated: nulls reject at the nominal 5% (16,000 null cells, MC sd 0.0017)
    assert 0.04 <= (p_raw[~is_planted] < 0.05).mean() <= 0.06
    discoveries = p_bh <= 0.10
    false_discoveries = discoveries & ~planted
    fdp = false_discoveries.sum(axis=1) / np.maximum(discoveries.sum(axis=1), 1)
    assert fdp.mean() <= 0.10 + 3 * fdp.std(ddof=1) / np.sqrt(n_sweeps)
    any_false_holm = ((p_holm <= 0.05) & ~planted).any(axis=1)
    assert any_false_holm.mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / n_sweeps)
    assert (p_bh[planted] <= 0.10).mean() >= 0.9  # planted effects are found
    assert (result["significant_bh"].to_numpy() == (result["p_bh"].to_numpy() <= 0.05)).all()


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
        _, expected_holm, _, _ = multipletests(rows["p_value"], method="holm")
        _, expected_bh, _, _ = multipletests(rows["p_value"], method="fdr_bh")
        np.testing.assert_allclose(rows["p_holm"], expected_holm)
        np.testing.assert_allclose(rows["p_bh"], expected_bh)


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
        assert not row["significant_holm"] and not row["significant_bh"]
        assert "non-finite ΔNLL in 1 of 6 windows" in row["note"]
    assert inf_row["seed_max"] == np.inf and np.isnan(nan_row["seed_sd"])  # a NaN seed is not averaged away
    tested = result.loc[result["layer"] >= 2]
    _, expected_holm, _, _ = multipletests(tested["p_value"], method="holm")  # family of the 3 finite cells
    np.testing.assert_allclose(tested["p_holm"], expected_holm)
    assert (tested["note"] == "").all()


def test_fewer_than_two_windows_and_all_zero_cells_are_reported_not_crashed() -> None:
    frames = [window_rows(np.array([[0.3], [0.4]]), layer=0), window_rows(np.zeros((3, 5)), layer=1)]
    result = significance(pd.concat(frames, ignore_index=True))
    single = one_row(result, layer=0)
    assert np.isnan(single["p_value"]) and single["note"] == NOTE_FEW_WINDOWS
    assert single["mean_delta_nll"] == pytest.approx(0.35)
    zero = one_row(result, layer=1)
    assert zero["p_value"] == 1.0 and zero["t_stat"] == 0.0 and zero["note"] == NOTE_ALL_ZERO


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
