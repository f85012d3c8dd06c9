"""scaling_fit(): planted power laws are recovered, CIs cover at the nominal rate, warnings say what is wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esa_pipeline.core.analysis import SCALING_COLUMNS, r2_required, scaling_fit

PARAMS = np.array([1e8, 3e8, 1e9, 3e9, 1e10, 4e10])


def models_relation(params_total, params_active=None, *, family="llama", vocab=32000, random_weights=False):
    n = len(params_total)
    return pd.DataFrame(
        {
            "model": [f"m{i}" for i in range(n)],
            "params_total": params_total,
            "params_active": params_total if params_active is None else params_active,
            "family": family if isinstance(family, list) else [family] * n,
            "vocab_size": vocab if isinstance(vocab, list) else [vocab] * n,
            "random_weights": random_weights if isinstance(random_weights, list) else [random_weights] * n,
        }
    )


def sensitivity_relation(delta_by_component: dict[str, np.ndarray]) -> pd.DataFrame:
    """delta_by_component[c][i] = mean ΔNLL of model m{i} (2 layers × 2 seeds averaging to it)."""
    rows = []
    for component, deltas in delta_by_component.items():
        for i, delta in enumerate(deltas):
            for layer, seed, offset in ((0, 0, -0.1), (0, 1, 0.1), (1, 0, 0.05), (1, 1, -0.05)):
                rows.append(
                    {
                        "model": f"m{i}",
                        "kind": "gaussian",
                        "component": component,
                        "layer": layer,
                        "expert": None,
                        "strength": 0.1,
                        "seed": seed,
                        "delta_nll": delta * (1 + offset),
                    }
                )
    return pd.DataFrame(rows)


def test_r2_required_is_the_t_test_threshold() -> None:
    t = stats.t.ppf(0.975, 1)  # n = 3: one residual degree of freedom, t = 12.706
    assert r2_required(3) == pytest.approx(t**2 / (t**2 + 1)) and r2_required(3) == pytest.approx(
        0.99384, abs=1e-5
    )
    assert r2_required(10) == pytest.approx(stats.t.ppf(0.975, 8) ** 2 / (stats.t.ppf(0.975, 8) ** 2 + 8))
    assert np.isnan(r2_required(2))


def test_planted_exponent_recovered_and_ci_coverage_is_nominal() -> None:
    rng = np.random.default_rng(11)
    n_sims, true_exponent = 200, -0.4
    log_noise = rng.normal(0, 0.3, size=(n_sims, len(PARAMS)))
    deltas = {f"sim{i}": np.exp(1.5 + true_exponent * np.log(PARAMS) + log_noise[i]) for i in range(n_sims)}
    result = scaling_fit(sensitivity_relation(deltas), models_relation(PARAMS))
    assert list(result.columns) == SCALING_COLUMNS
    assert len(result) == 2 * n_sims and set(result["param_basis"]) == {"total", "active"}
    total = result.loc[result["param_basis"] == "total"]
    covered = (total["exponent_ci_low"] <= true_exponent) & (true_exponent <= total["exponent_ci_high"])
    assert abs(covered.mean() - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / n_sims)
    assert total["exponent"].mean() == pytest.approx(true_exponent, abs=0.02)  # OLS is unbiased
    # the slope p-value and r2_required_p05 are the same test: p < 0.05 exactly when R² exceeds it
    assert ((total["p_value"] < 0.05) == (total["r2"] > total["r2_required_p05"])).all()
    assert (total["n_models"] == 6).all() and (total["warnings"] == "").all()


def test_exact_power_law_gives_exact_exponent_and_moe_active_basis_differs() -> None:
    active = PARAMS.copy()
    active[-1] = PARAMS[-1] / 8  # the largest model is an MoE using an eighth of its weights per token
    deltas = np.exp(2.0 - 0.5 * np.log(PARAMS) + np.array([0.01, -0.02, 0.0, 0.02, -0.01, 0.0]))
    result = scaling_fit(sensitivity_relation({"ffn.down": deltas}), models_relation(PARAMS, active))
    by_basis = result.set_index("param_basis")
    assert by_basis.loc["total", "exponent"] == pytest.approx(-0.5, abs=0.02)
    assert by_basis.loc["total", "exponent_ci_low"] < -0.5 < by_basis.loc["total", "exponent_ci_high"]
    assert by_basis.loc["total", "intercept"] == pytest.approx(2.0, abs=0.3)
    assert by_basis.loc["total", "r2"] > 0.99
    assert by_basis.loc["active", "exponent"] != pytest.approx(by_basis.loc["total", "exponent"], abs=1e-3)
    assert by_basis.loc["total", "models"] == "m0;m1;m2;m3;m4;m5"
    assert by_basis.loc["active", "models"] == "m0;m1;m2;m3;m5;m4"  # ordered by the basis' parameter count


def test_too_few_models_still_give_a_row_with_nan_fit_and_a_warning() -> None:
    result = scaling_fit(
        sensitivity_relation({"ffn.down": np.array([0.3, 0.2])}), models_relation(PARAMS[:2])
    )
    assert len(result) == 2
    row = result.iloc[0]
    assert row["n_models"] == 2 and np.isnan(row["exponent"]) and np.isnan(row["p_value"])
    assert row["warnings"].startswith("not enough models: 2 pretrained model(s) of family llama")


def test_non_positive_and_nonfinite_deltas_are_dropped_and_counted() -> None:
    deltas = np.array([0.5, -0.01, 0.0, 0.2, np.inf, 0.1])
    row = scaling_fit(sensitivity_relation({"ffn.down": deltas}), models_relation(PARAMS)).iloc[0]
    assert row["n_models"] == 3 and row["models"] == "m0;m3;m5"
    assert "2 model(s) with mean ΔNLL <= 0 dropped (no logarithm): m1, m2" in row["warnings"]
    assert "1 model(s) with non-finite ΔNLL" in row["warnings"] and "m4" in row["warnings"]
    assert np.isfinite(row["exponent"])
    short = scaling_fit(sensitivity_relation({"ffn.down": deltas}), models_relation(PARAMS), min_models=4).iloc[0]
    assert np.isnan(short["exponent"]) and short["warnings"].startswith("not enough models: 3 pretrained")


def test_families_are_fitted_apart_and_vocabularies_warned() -> None:
    deltas = {"ffn.down": np.array([0.5, 0.4, 0.3])}
    mixed = models_relation(PARAMS[:3], family=["llama", "phi3", "gpt_neox"], vocab=[32000, 32064, 50304])
    result = scaling_fit(sensitivity_relation(deltas), mixed)
    assert sorted(result["family"].unique()) == ["gpt_neox", "llama", "phi3"]
    assert result["exponent"].isna().all() and (result["n_models"] == 1).all()
    assert result["warnings"].str.startswith("not enough models: 1 pretrained model(s) of family").all()
    vocab = models_relation(PARAMS[:3], vocab=[32000, 32064, 50304])
    assert "differ in tokenizer vocabulary (32000, 32064, 50304)" in scaling_fit(
        sensitivity_relation(deltas), vocab
    ).iloc[0]["warnings"]


def test_random_weight_models_never_enter_a_fit() -> None:
    # m0..m2 pretrained on an exact power law, m3..m4 random-weight models far off it
    deltas = np.concatenate([np.exp(1.0 - 0.5 * np.log(PARAMS[:3])), [50.0, 0.001]])
    models = models_relation(PARAMS[:5], random_weights=[False, False, False, True, True])
    row = scaling_fit(sensitivity_relation({"ffn.down": deltas}), models).iloc[0]
    assert row["models"] == "m0;m1;m2" and row["n_models"] == 3
    assert row["exponent"] == pytest.approx(-0.5, abs=1e-9)  # the random models moved nothing
    assert "random-weight models left out (plumbing only, never in a fit): m3, m4" in row["warnings"]
    tiny = scaling_fit(sensitivity_relation({"ffn.down": deltas[:3]}), models_relation(PARAMS[:3], random_weights=True))
    assert len(tiny) == 2 and tiny["family"].isna().all() and tiny["exponent"].isna().all()
    assert tiny.iloc[0]["warnings"].startswith("not enough models: 0 pretrained model(s)")


def test_bad_arguments_name_the_fix() -> None:
    sensitivity = sensitivity_relation({"ffn.down": np.array([0.5, 0.4, 0.3])})
    with pytest.raises(ValueError, match="min_models must be >= 3"):
        scaling_fit(sensitivity, models_relation(PARAMS[:3]), min_models=2)
    with pytest.raises(ValueError, match="no `models` row for \\['m2'\\]"):
        scaling_fit(sensitivity, models_relation(PARAMS[:2]))
    with pytest.raises(ValueError, match="vocab_size"):
        scaling_fit(sensitivity, models_relation(PARAMS[:3]).drop(columns="vocab_size"))
