"""architecture_comparison(): normalised depth, depth bins, component ranks; dense-vs-MoE and instruct-vs-base."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esa_pipeline.core.analysis import (
    ARCHITECTURE_COLUMNS,
    GROUP_COMPARISON_COLUMNS,
    architecture_comparison,
    dense_vs_moe,
    depth_bins,
    instruct_vs_base,
)


def models_relation(specs: list[tuple[str, int, bool, bool, bool]]) -> pd.DataFrame:
    """specs: (model, n_layers, is_moe, instruct, random_weights)."""
    return pd.DataFrame(
        [
            {
                "model": m,
                "family": "mixtral" if moe else "llama",
                "n_layers": n,
                "is_moe": moe,
                "instruct": inst,
                "random_weights": rnd,
            }
            for m, n, moe, inst, rnd in specs
        ]
    )


def sensitivity_for(model: str, n_layers: int, level: dict[str, float], seeds: int = 2) -> pd.DataFrame:
    """Flat profiles: ΔNLL of each component = level[component] at every layer and seed."""
    return pd.DataFrame(
        [
            {
                "model": model,
                "kind": "gaussian",
                "component": c,
                "layer": layer,
                "expert": None,
                "strength": 0.1,
                "seed": seed,
                "delta_nll": value,
            }
            for c, value in level.items()
            for layer in range(n_layers)
            for seed in range(seeds)
        ]
    )


def test_depth_bins_are_ten_equal_bins_over_unit_depth() -> None:
    depth = pd.Series([0.0, 0.05, 0.1, 3 / 10, 0.999, np.nan])
    assert depth_bins(depth).tolist() == [0, 0, 1, 3, 9, pd.NA]
    thirty_layers = pd.Series(np.arange(30) / 30)
    assert depth_bins(thirty_layers).value_counts().sort_index().tolist() == [3] * 10


def test_profiles_on_normalised_depth_with_metadata_and_component_ranks() -> None:
    models = models_relation([("deep", 30, False, False, False), ("shallow", 4, True, True, False)])
    sensitivity = pd.concat(
        [
            sensitivity_for("deep", 30, {"ffn.down": 0.9, "attention.query": 0.1, "norm.input": 0.5}),
            sensitivity_for("shallow", 4, {"ffn.down": 0.2, "attention.query": 0.7}),
        ]
    )
    result = architecture_comparison(sensitivity, models)
    assert list(result.columns) == ARCHITECTURE_COLUMNS
    shallow = result.loc[(result["model"] == "shallow") & (result["component"] == "ffn.down")]
    assert shallow["depth"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert shallow["depth_bin"].tolist() == [0, 2, 5, 7]
    assert shallow[["family", "is_moe", "instruct"]].drop_duplicates().values.tolist() == [
        ["mixtral", True, True]
    ]
    ranks = result.drop_duplicates(["model", "component"]).set_index(["model", "component"])["component_rank"]
    assert ranks[("deep", "ffn.down")] == 1 and ranks[("deep", "norm.attn_in")] == 2  # old alias -> role
    assert ranks[("deep", "attention.query")] == 3
    assert ranks[("shallow", "attention.query")] == 1 and ranks[("shallow", "ffn.down")] == 2
    assert result["mean_delta_nll"].loc[result["model"] == "deep"].isin([0.9, 0.1, 0.5]).all()


def test_architecture_comparison_needs_every_model_described() -> None:
    sensitivity = sensitivity_for("m", 2, {"ffn.down": 0.1})
    with pytest.raises(ValueError, match="no `models` row for \\['m'\\]"):
        architecture_comparison(sensitivity, models_relation([("other", 2, False, False, False)]))
    with pytest.raises(ValueError, match="outside 0..0"):
        architecture_comparison(sensitivity, models_relation([("m", 1, False, False, False)]))


def test_dense_vs_moe_difference_and_tests_match_scipy_on_model_level_means() -> None:
    rng = np.random.default_rng(0)
    moe_levels, dense_levels = 1.0 + rng.normal(0, 0.05, 3), 0.5 + rng.normal(0, 0.05, 4)
    specs, frames = [], []
    for i, level in enumerate(moe_levels):
        specs.append((f"moe{i}", 4, True, False, False))
        frames.append(sensitivity_for(f"moe{i}", 4, {"ffn.down": level}))
    for i, level in enumerate(dense_levels):
        specs.append((f"dense{i}", 6, False, False, False))
        frames.append(sensitivity_for(f"dense{i}", 6, {"ffn.down": level}))
    models = models_relation(specs)
    comparison = architecture_comparison(pd.concat(frames), models)
    result = dense_vs_moe(comparison, models)
    assert list(result.columns) == GROUP_COMPARISON_COLUMNS
    assert set(result["component"]) == {"ffn.down", "all"}
    row = result.loc[result["component"] == "ffn.down"].iloc[0]
    assert (row["group_a"], row["group_b"], row["n_a"], row["n_b"]) == ("moe", "dense", 3, 4)
    assert row["difference"] == pytest.approx(moe_levels.mean() - dense_levels.mean())
    welch = stats.ttest_ind(moe_levels, dense_levels, equal_var=False)
    assert row["welch_t"] == pytest.approx(welch.statistic) and row["welch_p"] == pytest.approx(welch.pvalue)
    assert row["mannwhitney_u"] == 12.0  # every MoE model above every dense model: U = 3·4
    assert row["models_a"] == "moe0;moe1;moe2" and row["warnings"] == ""


def test_single_model_groups_are_warned_not_tested_and_random_weight_models_never_enter() -> None:
    models = models_relation(
        [
            ("a", 2, False, True, False),
            ("b", 2, False, False, False),
            ("c", 2, False, False, False),
            ("tiny", 2, False, True, True),
        ]
    )
    frames = [
        sensitivity_for(m, 2, {"ffn.down": v}) for m, v in (("a", 0.3), ("b", 0.1), ("c", 0.2), ("tiny", 9.0))
    ]
    comparison = architecture_comparison(pd.concat(frames), models)
    assert set(comparison["model"]) == {"a", "b", "c"}  # the random-weight model is plumbing only
    result = instruct_vs_base(comparison, models)
    row = result.loc[result["component"] == "ffn.down"].iloc[0]
    assert (row["group_a"], row["n_a"], row["n_b"]) == ("instruct", 1, 2)
    assert row["difference"] == pytest.approx(0.3 - 0.15)
    assert np.isnan(row["welch_p"]) and np.isnan(row["mannwhitney_p"])
    assert "fewer than 2 models in a group" in row["warnings"]
    assert "random-weight models left out (plumbing only): tiny" in row["warnings"]
    no_moe = dense_vs_moe(comparison).iloc[0]
    assert no_moe["n_a"] == 0 and np.isnan(no_moe["mean_a"]) and "moe: 0" in no_moe["warnings"]
    # a random model passed straight to a contrast is dropped there too
    leaked = pd.concat([comparison, comparison.assign(model="tiny", mean_delta_nll=9.0)])
    assert instruct_vs_base(leaked, models).iloc[0]["mean_a"] == pytest.approx(0.3)
    only_tiny = architecture_comparison(frames[3], models)
    assert only_tiny.empty and list(only_tiny.columns) == ARCHITECTURE_COLUMNS


@pytest.mark.parametrize("overflow", [np.inf, np.nan])
def test_an_overflowed_component_ranks_first_not_unranked(overflow) -> None:
    # component_rank used na_option="keep": a component whose loss overflowed to NaN got no rank, beside the
    # finite ones ranked 1..n, as if it were not measured; an overflow is the most sensitive outcome
    sens = sensitivity_for("a", 4, {"attention.query": 0.1, "ffn.down": 0.5, "ffn.up": overflow})
    out = architecture_comparison(sens, models_relation([("a", 4, False, False, False)]))
    ranks = out.groupby("component")["component_rank"].first().to_dict()
    assert ranks == {"ffn.up": 1, "ffn.down": 2, "attention.query": 3}
