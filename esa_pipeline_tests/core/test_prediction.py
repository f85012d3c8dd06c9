"""Small-σ prediction ½σ²·Σ rms²·curvature against measured loss changes on tiny-llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esa_pipeline.core.evaluation.paired import evaluate_against
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.importance.metrics import importance_scores
from esa_pipeline.core.importance.prediction import (
    PREDICTION_COLUMNS,
    noise_floor,
    predicted_delta_nll,
    prediction_check,
)
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.models.registry import load_model
from esa_pipeline.core.perturbation.perturb import Perturbation

TEXT = ("The harbour pilots met before dawn to read the tide tables and argue about the wind. "
        "By noon the freighter had cleared the bar and the gulls followed it out past the lighthouse.")
GROUPS = [("attention.value", 0), ("attention.value", 3), ("norm.input", 0), ("norm.input", 3)]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _model_sampled_ids(model, n: int, length: int) -> torch.Tensor:
    """Text drawn from the model itself: there the model IS the data distribution, so E[Fisher] = E[Hessian]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((n, 1), 256, dtype=torch.long)  # [n, 1] BOS
    with torch.no_grad():
        for _ in range(length - 1):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()  # [n, V]
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=gen)], dim=1)
    return ids  # [n, length]


def _mean_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()  # [n, T-1, V]
    return float(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:]))


def _antithetic_delta(model, adapter, ids, component, layer, sigma, draws=4) -> float:
    """E[ΔL] by ½(L(W+δ) + L(W-δ)) - L(W): the linear term cancels exactly, leaving ½δᵀHδ + O(δ⁴)."""
    view = adapter.slices(component, layer)[0].get(model)
    original = view.clone()
    rms = original.pow(2).mean().sqrt()
    base = _mean_nll(model, ids)
    total = 0.0
    try:
        for draw in range(draws):
            delta = sigma * rms * torch.randn(view.shape, generator=torch.Generator().manual_seed(draw))
            view.copy_(original + delta)
            plus = _mean_nll(model, ids)
            view.copy_(original - delta)
            minus = _mean_nll(model, ids)
            total += 0.5 * (plus + minus) - base
    finally:
        view.copy_(original)
    return total / draws


def test_prediction_matches_measured_curvature_on_model_sampled_text(tiny):
    model, adapter = tiny.model, adapter_for(tiny.model)
    ids = _model_sampled_ids(model, 6, 40)
    result = importance_scores(tiny, adapter, [ids], ("grad_sq", "hutchinson"),
                               components=["attention.value", "norm.input"], layers=[0, 3], hutchinson_samples=6,
                               batch_size=6)
    sigma = 0.05
    for component, layers in (("attention.value", (0, 3)), ("norm.input", (0, 3))):
        measured = {layer: _antithetic_delta(model, adapter, ids, component, layer, sigma) for layer in layers}
        for layer in layers:
            fisher = predicted_delta_nll(tiny, result, component, layer, sigma)
            hessian = predicted_delta_nll(tiny, result, component, layer, sigma, curvature="hutchinson")
            assert 0.4 < fisher / measured[layer] < 2.5, (component, layer, fisher, measured[layer])
            assert 0.5 < hessian / measured[layer] < 2.0, (component, layer, hessian, measured[layer])
        # the early layer is the more sensitive one, and the prediction says so too
        assert measured[0] > measured[3]
        assert predicted_delta_nll(tiny, result, component, 0, sigma) > predicted_delta_nll(
            tiny, result, component, 3, sigma)


def test_prediction_check_rows(tiny):
    base = perplexity(tiny, [TEXT], window=48, max_tokens=96)
    adapter = adapter_for(tiny.model)
    result = importance_scores(tiny, adapter, base, ("grad_sq",), components=["norm.input"], layers=[1])
    rows = prediction_check(tiny, base, result, [0.05], seeds=(0, 1), antithetic=False)
    assert list(rows.columns) == PREDICTION_COLUMNS
    row = rows.iloc[0]
    # norm gains of a fresh model are all 1, so rms² = 1 and the prediction is ½σ²·ΣF
    fisher_sum = float(result.scores_for("grad_sq", "norm.input", 1)[0].sum())
    assert row.predicted_delta_nll == pytest.approx(0.5 * 0.05**2 * fisher_sum, rel=1e-6)
    direct = [evaluate_against(tiny, base, Perturbation("gaussian", "norm.input", 1, 0.05, s)).delta_nll
              for s in (0, 1)]
    assert row.measured_delta_nll == pytest.approx(sum(direct) / 2, rel=1e-9)
    assert row.ratio == pytest.approx(row.measured_delta_nll / row.predicted_delta_nll)
    # antithetic: each seed is the mean of +δ and −δ, the same draw negated
    paired = prediction_check(tiny, base, result, [0.05], seeds=(0,)).iloc[0]
    minus = evaluate_against(tiny, base, Perturbation("gaussian", "norm.input", 1, 0.05, 0, antithetic=True)).delta_nll
    assert paired.antithetic and paired.measured_delta_nll == pytest.approx((direct[0] + minus) / 2, rel=1e-9)
    assert minus != pytest.approx(direct[0], rel=1e-3)
    other = importance_scores(tiny, adapter, base.token_windows[:1], ("grad_sq",), components=["norm.input"],
                              layers=[1])
    with pytest.raises(ValueError, match="same windows"):
        prediction_check(tiny, base, other, [0.05])
    with pytest.raises(ValueError, match="curvature"):
        predicted_delta_nll(tiny, result, "norm.input", 1, 0.05, curvature="fisher")


def test_noise_floor_is_twice_the_seed_se_or_the_float32_resolution() -> None:
    se, floor = noise_floor([0.010, 0.014], mean_nll=3.0)
    assert se == pytest.approx(0.002) and floor == pytest.approx(0.004)  # SD 0.002828 / sqrt(2) = 0.002
    se, floor = noise_floor([0.5], mean_nll=3.0)  # one seed: no spread, the fp32 resolution alone
    assert np.isnan(se) and floor == pytest.approx(np.finfo(np.float32).eps * 3.0)
    se, floor = noise_floor([1e-9, 1e-9], mean_nll=4.0)  # identical draws: resolution still bounds it
    assert se == 0.0 and floor == pytest.approx(np.finfo(np.float32).eps * 4.0)


def test_points_below_the_noise_floor_are_flagged_and_get_no_ratio(tiny):
    base = perplexity(tiny, [TEXT], window=48, max_tokens=96)
    adapter = adapter_for(tiny.model)
    result = importance_scores(tiny, adapter, base, ("grad_sq",), components=["norm.input"], layers=[1])
    rows = prediction_check(tiny, base, result, [1e-9, 0.05], seeds=(0, 1)).set_index("strength")
    tiny_sigma, usable = rows.loc[1e-9], rows.loc[0.05]
    # σ = 1e-9 moves no float32 weight: ΔNLL is 0, below any floor, and no ratio is formed from it
    assert tiny_sigma["below_noise_floor"] and np.isnan(tiny_sigma["ratio"])
    assert abs(tiny_sigma["measured_delta_nll"]) < tiny_sigma["noise_floor"]
    assert not usable["below_noise_floor"] and np.isfinite(usable["ratio"])
    assert usable["noise_floor"] >= 2 * usable["measured_se"] and np.isfinite(usable["measured_se"])


@pytest.mark.parametrize("predicted", [-0.01, 0.0])
def test_a_prediction_that_is_not_positive_gets_no_ratio_and_the_reason(tiny, monkeypatch, predicted):
    # Hutchinson estimates H_ii itself, which need not be positive: ½σ²Σ rms²·H_ii <= 0 is no expected loss
    # increase, and measured / predicted was stored as a (negative) ratio.
    import esa_pipeline.core.importance.prediction as prediction

    base = perplexity(tiny, [TEXT], window=48, max_tokens=96)
    adapter = adapter_for(tiny.model)
    result = importance_scores(tiny, adapter, base, ("grad_sq",), components=["norm.input"], layers=[1])
    monkeypatch.setattr(prediction, "predicted_delta_nll", lambda *args, **kwargs: predicted)
    row = prediction_check(tiny, base, result, [0.05], seeds=(0, 1)).iloc[0]
    assert not row["below_noise_floor"] and np.isnan(row["ratio"])
    assert row["note"] == f"predicted ΔNLL {predicted:g} <= 0 (the curvature estimate is not positive): no ratio"
    below = prediction_check(tiny, base, result, [1e-9], seeds=(0, 1)).iloc[0]
    assert below["note"] == "below the noise floor: no ratio"
