"""Layer profiles, seed consistency (Spearman), critical layers and Jaccard against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from esa_pipeline.core.analysis import (
    CRITICAL_LAYERS_COLUMNS,
    SEED_CONSISTENCY_COLUMNS,
    critical_layers,
    jaccard,
    layer_profiles,
    seed_consistency,
    significance,
)
from esa_pipeline.core.analysis.consistency import NOTE_NONE_SIGNIFICANT


def sensitivity_rows(
    profiles: dict[tuple[str, int], list[float]], *, model: str = "m", **extra
) -> pd.DataFrame:
    """profiles[(component, seed)] = ΔNLL per layer 0..n-1 → `sensitivity` rows (gaussian, σ = 0.1)."""
    rows = [
        {
            "model": model,
            "kind": "gaussian",
            "component": component,
            "layer": layer,
            "expert": None,
            "strength": 0.1,
            "seed": seed,
            "delta_nll": value,
            **extra,
        }
        for (component, seed), values in profiles.items()
        for layer, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_spearman_of_seed_profiles_matches_hand_computed_values() -> None:
    sensitivity = sensitivity_rows(
        {("ffn.down", 0): [1, 2, 3, 4], ("ffn.down", 1): [1, 3, 2, 4], ("ffn.down", 2): [4, 3, 2, 1]}
    )
    result = seed_consistency(sensitivity)
    assert list(result.columns) == SEED_CONSISTENCY_COLUMNS
    rho = {(a, b): r for a, b, r in result[["seed_a", "seed_b", "spearman_rho"]].itertuples(index=False)}
    # one swapped pair among 4 layers: 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/60 = 0.8
    assert rho[(0, 1)] == pytest.approx(0.8)
    assert rho[(0, 2)] == pytest.approx(-1.0)
    assert rho[(1, 2)] == pytest.approx(-0.8)
    assert (result["n_layers"] == 4).all()


def test_spearman_is_nan_for_constant_profiles_and_too_few_layers() -> None:
    constant = sensitivity_rows({("ffn.down", 0): [1, 1, 1], ("ffn.down", 1): [1, 2, 3]})
    assert np.isnan(seed_consistency(constant)["spearman_rho"].item())
    two_layers = sensitivity_rows({("ffn.down", 0): [1, 2], ("ffn.down", 1): [1, 2]})
    row = seed_consistency(two_layers).iloc[0]
    assert np.isnan(row["spearman_rho"]) and row["n_layers"] == 2


def test_layer_profiles_prefer_all_expert_rows_and_average_single_experts_otherwise() -> None:
    base = {"model": "moe", "kind": "gaussian", "component": "ffn.down", "strength": 0.1, "seed": 0}
    rows = pd.DataFrame(
        [
            {**base, "layer": 0, "expert": None, "delta_nll": 5.0},  # all experts measured: this is layer 0
            {**base, "layer": 0, "expert": 0, "delta_nll": 1.0},
            {**base, "layer": 1, "expert": 0, "delta_nll": 1.0},  # only single experts: their mean
            {**base, "layer": 1, "expert": 1, "delta_nll": 3.0},
        ]
    )
    profile = layer_profiles(rows).set_index("layer")["mean_delta_nll"]
    assert profile.to_dict() == {0: 5.0, 1: 2.0}


def test_nan_delta_is_not_averaged_away() -> None:
    rows = sensitivity_rows({("ffn.down", 0): [0.1, np.nan], ("ffn.down", 1): [0.3, 0.2]})
    profile = layer_profiles(rows).set_index("layer")["mean_delta_nll"]
    assert profile[0] == pytest.approx(0.2) and np.isnan(profile[1])


def significance_rows(
    means: dict[str, list[float]], significant: dict[str, list[bool | None]], *, model: str = "m"
) -> pd.DataFrame:
    """`significance`-shaped rows: means[component][layer] and its significant_bh flag (None = untested)."""
    return pd.DataFrame(
        [
            {
                "model": model,
                "kind": "gaussian",
                "component": component,
                "layer": layer,
                "expert": None,
                "strength": 0.1,
                "mean_delta_nll": value,
                "significant_bh": significant[component][layer],
            }
            for component, values in means.items()
            for layer, value in enumerate(values)
        ]
    )


def test_critical_layers_pick_the_planted_significant_layer_with_depth_and_rank() -> None:
    rng = np.random.default_rng(0)
    n_layers = 30
    means, flags = {}, {}
    for component, planted in (("attention.output", 7), ("ffn.down", 21)):
        values = rng.uniform(0.0, 0.1, n_layers)
        values[planted] = 2.0
        means[component] = list(values)
        flags[component] = [layer == planted for layer in range(n_layers)]
    result = critical_layers(significance_rows(means, flags), {"m": n_layers})
    assert list(result.columns) == CRITICAL_LAYERS_COLUMNS
    for component, planted in (("attention.output", 7), ("ffn.down", 21)):
        rows = result.loc[result["component"] == component]
        assert len(rows) == n_layers
        top = rows.loc[rows["rank"] == 1].iloc[0]
        assert top["layer"] == planted and top["depth"] == pytest.approx(planted / n_layers)
        # 10% of 30 layers would allow 3, but only one is significant: no minimum is forced
        assert rows.loc[rows["is_critical"], "layer"].tolist() == [planted]
    overall = result.loc[result["component"] == "all"]
    assert set(overall.loc[overall["is_critical"], "layer"]) == {7, 21}
    assert set(overall.loc[overall["rank"] <= 2, "layer"]) == {7, 21}
    layer7 = overall.loc[overall["layer"] == 7, "mean_delta_nll"].item()
    assert 1.0 <= layer7 <= 1.05  # overall = mean over components at that layer


def test_no_significant_layer_means_no_critical_layer_and_a_note() -> None:
    rows = significance_rows({"ffn.down": [0.5, 0.9, 0.2, 0.1]}, {"ffn.down": [False, False, None, False]})
    result = critical_layers(rows, {"m": 4})
    ffn = result.loc[result["component"] == "ffn.down"].set_index("layer")
    assert not ffn["is_critical"].any() and (ffn["note"] == NOTE_NONE_SIGNIFICANT).all()
    assert ffn["rank"].to_dict() == {1: 1, 0: 2, 2: 3, 3: 4}
    assert pd.isna(ffn.loc[2, "significant"]) and ffn.loc[1, "significant"] == False  # noqa: E712


def test_nonfinite_cells_rank_as_most_sensitive_and_are_critical() -> None:
    rows = significance_rows(
        {"ffn.down": [0.5, np.inf, 0.9, np.nan, 0.3] + [0.01] * 15},
        {"ffn.down": [True, None, True, None, True] + [False] * 15},
    )
    result = critical_layers(rows, {"m": 20}, top_fraction=0.2)  # 4 slots of 20
    ffn = result.loc[result["component"] == "ffn.down"].set_index("layer")
    assert ffn["rank"].head(5).to_dict() == {1: 1, 3: 2, 2: 3, 0: 4, 4: 5}  # overflowed first, by layer
    assert ffn.loc[ffn["is_critical"]].index.tolist() == [1, 3, 2, 0]
    assert (ffn["note"] == "").all()


def test_random_weight_models_get_no_critical_layers() -> None:
    rows = pd.concat(
        [
            significance_rows({"ffn.down": [0.5, 0.9]}, {"ffn.down": [True, True]}, model="real"),
            significance_rows({"ffn.down": [0.5, 0.9]}, {"ffn.down": [True, True]}, model="tiny"),
        ]
    )
    models = pd.DataFrame({"model": ["real", "tiny"], "n_layers": [2, 2], "random_weights": [False, True]})
    assert set(critical_layers(rows, models)["model"]) == {"real"}


def test_critical_layers_accept_the_significance_relation() -> None:
    n_windows, n_layers = 6, 10
    rng = np.random.default_rng(2)
    windows = pd.DataFrame(
        [
            {
                "model": "m",
                "kind": "gaussian",
                "component": "ffn.up",
                "layer": layer,
                "expert": None,
                "strength": 0.1,
                "seed": seed,
                "window_id": w,
                "n_tokens": 100,
                "delta_nll_sum": 100 * ((1.0 if layer == 4 else 0.0) + rng.normal(0, 0.05)),
            }
            for layer in range(n_layers)
            for seed in (0, 1, 2)
            for w in range(n_windows)
        ]
    )
    result = critical_layers(significance(windows), {"m": n_layers})
    critical = result.loc[result["is_critical"] & (result["component"] == "ffn.up")]
    assert critical["layer"].tolist() == [4]


def test_critical_layers_errors_name_the_fix() -> None:
    rows = significance_rows({"ffn.down": [0.1, 0.2]}, {"ffn.down": [True, False]})
    with pytest.raises(ValueError, match="no `models` row for \\['m'\\]"):
        critical_layers(rows, {"other": 2})
    with pytest.raises(ValueError, match="outside 0..0"):
        critical_layers(rows, {"m": 1})
    with pytest.raises(ValueError, match="top_fraction"):
        critical_layers(rows, {"m": 2}, top_fraction=0)
    with pytest.raises(ValueError, match="mode"):
        critical_layers(pd.concat([rows.assign(mode="noise"), rows.assign(mode="zero")]), {"m": 2})
    with pytest.raises(ValueError, match="significant after correction"):
        critical_layers(sensitivity_rows({("ffn.down", 0): [0.1, 0.2]}), {"m": 2})


def test_seed_consistency_leaves_out_deterministic_rows() -> None:
    rows = sensitivity_rows({("ffn.down", 0): [1, 2, 3, 4], ("ffn.down", 1): [1, 3, 2, 4]})
    scale = sensitivity_rows({("norm.input", 0): [1, 2, 3, 4]}).assign(kind="scale", seed=None)
    # the same norm gain measured under two seeds: identical profiles, left out too (ρ = 1 by construction)
    scale_per_seed = sensitivity_rows({("norm.input", 0): [1, 2, 3, 4], ("norm.input", 1): [1, 2, 3, 4]}).assign(
        kind="scale"
    )
    result = seed_consistency(pd.concat([rows, scale, scale_per_seed], ignore_index=True))
    assert set(result["kind"]) == {"gaussian"} and len(result) == 1


def test_jaccard_matches_hand_computed_overlaps() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert jaccard([1, 2, 2, 3], np.array([1, 2, 3])) == 1.0
    assert jaccard({1}, {2}) == 0.0
    assert jaccard([(0, 1), (2, 3)], [(2, 3)]) == 0.5
    assert math.isnan(jaccard([], set()))


def test_a_profile_with_no_tested_layer_says_untested_not_none_significant() -> None:
    # One seed of a stochastic kind (or one window) leaves every headline flag NULL: "none significant: no
    # layer's effect survives the correction" stood in for "could not test".
    from esa_pipeline.core.analysis.consistency import NOTE_NONE_TESTED

    rows = significance_rows({"ffn.down": [0.5, 0.9, 0.2]}, {"ffn.down": [None, None, None]})
    result = critical_layers(rows, {"m": 3})
    for component in ("ffn.down", "all"):
        part = result.loc[result["component"] == component]
        assert not part["is_critical"].any() and part["significant"].isna().all()
        assert (part["note"] == NOTE_NONE_TESTED).all(), part["note"].tolist()
    assert NOTE_NONE_TESTED.startswith("none tested:")
    # an overflowed layer needs no test: it stays critical
    overflow = critical_layers(significance_rows({"ffn.down": [0.5, np.inf, 0.2]}, {"ffn.down": [None] * 3}),
                               {"m": 3})  # fmt: skip
    ffn = overflow.loc[overflow["component"] == "ffn.down"]
    assert ffn.loc[ffn["is_critical"], "layer"].tolist() == [1] and (ffn["note"] == "").all()


def test_a_null_seed_consistency_rho_says_why() -> None:
    from esa_pipeline.core.analysis.consistency import SEED_CONSISTENCY_COLUMNS

    constant = seed_consistency(sensitivity_rows({("ffn.down", 0): [1, 1, 1], ("ffn.down", 1): [1, 2, 3]})).iloc[0]
    assert constant["note"] == "a constant layer profile has no ranking"
    two = seed_consistency(sensitivity_rows({("ffn.down", 0): [1, 2], ("ffn.down", 1): [1, 2]})).iloc[0]
    assert two["note"] == "2 layers measured in both seeds (a rank correlation needs 3)"
    fine = seed_consistency(sensitivity_rows({("ffn.down", 0): [1, 2, 3], ("ffn.down", 1): [1, 3, 2]})).iloc[0]
    assert fine["note"] == "" and fine["spearman_rho"] == pytest.approx(0.5)
    assert SEED_CONSISTENCY_COLUMNS[-1] == "note"
