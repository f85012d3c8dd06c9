"""Causal validation (top-k vs random-k vs bottom-k), ranking overlaps and super-weight detection."""

from __future__ import annotations

import pytest
import torch

from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.importance.metrics import ImportanceResult, SliceGroupScores, importance_scores
from esa_pipeline.core.importance.super_weights import SUPER_WEIGHT_COLUMNS, find_super_weights
from esa_pipeline.core.importance.validation import (
    VALIDATION_COLUMNS,
    halves,
    metric_overlap,
    selected_count,
    stability_overlap,
    validate_importance,
)
from esa_pipeline.core.models.adapters import ParamSlice, adapter_for
from esa_pipeline.core.models.registry import load_model

TEXT = ("The harbour pilots met before dawn to read the tide tables and argue about the wind. "
        "By noon the freighter had cleared the bar and the gulls followed it out past the lighthouse.")


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-llama")
    return lm, perplexity(lm, [TEXT], window=48, max_tokens=96)


def test_validation_rows_and_top_hurts_more_than_bottom(tiny):
    lm, base = tiny
    result = importance_scores(lm, adapter_for(lm.model), base, ("magnitude", "grad_x_weight"),
                               components=["ffn.down"], layers=[1])
    rows = validate_importance(lm, base, result, kinds=("zero",), fractions=(0.05,), seeds=(0, 1))
    assert list(rows.columns) == VALIDATION_COLUMNS
    n = lm.model.model.layers[1].mlp.down_proj.weight.numel()
    assert (rows["k"] == selected_count(0.05, n)).all() and selected_count(0.05, n) == round(0.05 * n)
    assert rows["restored"].all()
    # random-k is metric-independent: one evaluation per seed, repeated under each metric
    random = rows[rows["selection"] == "random"]
    assert sorted(random["seed"].tolist()) == [0, 0, 1, 1]
    assert random.groupby("seed")["delta_nll"].nunique().eq(1).all()
    assert (rows[rows["selection"] != "random"]["seed"] == 0).all()  # top/bottom draw nothing: evaluated once
    by = rows[rows["selection"] != "random"].set_index(["metric", "selection"])["delta_nll"].to_dict()
    for metric in ("magnitude", "grad_x_weight"):
        assert by[(metric, "top")] > abs(by[(metric, "bottom")])
    assert by[("grad_x_weight", "top")] > random["delta_nll"].max()


def test_gaussian_on_selected_weights_is_refused(tiny):
    lm, base = tiny
    result = importance_scores(lm, adapter_for(lm.model), base, ("magnitude",), components=["ffn.down"],
                               layers=[1])
    with pytest.raises(ValueError, match="cannot target selected weights"):
        validate_importance(lm, base, result, kinds=("gaussian",))


def _hand_result(scores_a: torch.Tensor, scores_b: torch.Tensor) -> ImportanceResult:
    group = SliceGroupScores("ffn.up", 0, None, [ParamSlice("w", None, (), 0)],
                             {"magnitude": [scores_a], "grad_sq": [scores_b]})
    return ImportanceResult("m", ("magnitude", "grad_sq"), [group], 1, 1, "token", 0, 0,
                            param_shapes={"w": tuple(scores_a.shape)})


def test_overlaps_are_jaccard_of_top_k_sets():
    a = torch.tensor([[9.0, 8.0, 1.0], [0.0, 7.0, 2.0]])
    same = _hand_result(a, a * 3)  # same ranking
    assert metric_overlap(same, 3)["jaccard"].tolist() == [1.0]
    disjoint = _hand_result(a, -a)  # top-2 {0, 1} vs top-2 {3, 2}
    assert metric_overlap(disjoint, 2)["jaccard"].tolist() == [0.0]
    partial = _hand_result(a, torch.tensor([[9.0, 0.0, 8.0], [0.0, 0.0, 0.0]]))  # {0,1} vs {0,2}
    assert metric_overlap(partial, 2)["jaccard"].tolist() == [pytest.approx(1 / 3)]
    stable = stability_overlap(same, disjoint, 2)
    assert stable.set_index("metric_a")["jaccard"].to_dict() == {"magnitude": 1.0, "grad_sq": 0.0}


def test_halves_split_windows(tiny):
    _, base = tiny
    first, second = halves(base)
    assert first + second == base.token_windows and first and second
    with pytest.raises(ValueError, match=">= 2 windows"):
        halves(base.token_windows[:1])


def test_super_weight_is_found_where_it_was_planted():
    lm = load_model("tiny-llama")
    mlp = lm.model.model.layers[1].mlp
    # a massive intermediate activation on channel 7 that one down_proj weight carries to hidden channel 5
    mlp.gate_proj.weight[7] *= 40.0
    mlp.up_proj.weight[7] *= 40.0
    mlp.down_proj.weight[5, 7] = 3.0
    rows = find_super_weights(lm, [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))])
    assert list(rows.columns) == SUPER_WEIGHT_COLUMNS
    top = rows.iloc[0]
    assert (top.layer, top.row, top.col) == (1, 5, 7)
    assert top.weight_value == pytest.approx(3.0) and top.spike_ratio >= 10
    every = find_super_weights(lm, [torch.randint(0, 256, (1, 16))], all_layers=True)
    assert sorted(every["layer"]) == [0, 1, 2, 3]


def test_super_weights_refuse_fused_experts():
    lm = load_model("tiny-mixtral")
    with pytest.raises(ValueError, match="fused MoE experts"):
        find_super_weights(lm, [torch.randint(0, 256, (1, 16))])
