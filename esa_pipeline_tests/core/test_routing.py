"""MoE routing under router perturbations on tiny-mixtral (random weights: plumbing, not science)."""

from __future__ import annotations

import math

import pytest
import torch

from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.importance.routing import (
    MOE_ROUTING_COLUMNS,
    expert_assignments,
    expert_change_rate,
    load_entropy,
    routing_sweep,
)
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.models.registry import load_model

TEXT = ("The harbour pilots met before dawn to read the tide tables and argue about the wind. "
        "By noon the freighter had cleared the bar and the gulls followed it out past the lighthouse.")


@pytest.fixture(scope="module")
def mixtral():
    lm = load_model("tiny-mixtral")
    return lm, perplexity(lm, [TEXT], window=48, max_tokens=96, batch_size=2)


def test_change_rate_and_entropy_by_hand():
    base = torch.tensor([[0, 1], [2, 3], [0, 3]])
    assert expert_change_rate(base, torch.tensor([[0, 1], [2, 3], [0, 3]])) == 0.0
    assert expert_change_rate(base, torch.tensor([[0, 1], [1, 3], [0, 3]])) == pytest.approx(1 / 3)
    assert load_entropy(torch.tensor([[0, 1], [2, 3]]), 4) == pytest.approx(math.log(4))  # uniform load
    assert load_entropy(torch.tensor([[0, 0], [0, 0]]), 4) == 0.0  # one expert takes everything
    with pytest.raises(ValueError, match="different tokens"):
        expert_change_rate(base, base[:2])


def test_assignments_are_the_routers_top_k_on_scored_tokens(mixtral):
    lm, base = mixtral
    adapter = adapter_for(lm.model)
    got = expert_assignments(lm.model, adapter, base.batches(), [0, 2])
    assert got[0].shape == (base.n_tokens, 2)  # one sorted top-2 set per scored token
    # the same rule by hand on layer 0: top-k of softmax(router logits) on the hidden states entering it
    captured = []
    router = adapter.router(lm.model, 0)
    handle = router.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        for batch in base.batches():
            with torch.inference_mode():
                lm.model(input_ids=batch.input_ids, use_cache=False)
    finally:
        handle.remove()
    hidden = torch.cat([h[b.score_mask.reshape(-1)] for h, b in zip(captured, base.batches(), strict=True)])
    logits = hidden @ router.weight.T  # [n, E]
    expected = torch.topk(logits, 2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(got[0], expected)


def test_routing_sweep_rows_noop_and_large_sigma(mixtral):
    lm, base = mixtral
    rows = routing_sweep(lm, base, [1e-7, 3.0], seeds=[0], layers=[1])
    assert list(rows.columns) == MOE_ROUTING_COLUMNS
    tiny, large = rows.iloc[0], rows.iloc[1]
    assert tiny.expert_change_rate == 0.0 and abs(tiny.delta_nll) < 1e-4
    assert large.expert_change_rate > 0.2
    assert tiny.load_entropy_baseline == large.load_entropy_baseline <= math.log(4) + 1e-9
    assert rows["model"].eq("tiny-mixtral").all()
    # the model is restored: baseline routing is reproduced after the sweep
    again = routing_sweep(lm, base, [1e-7], seeds=[0], layers=[1])
    assert again.iloc[0].expert_change_rate == 0.0


def test_dense_model_is_refused():
    lm = load_model("tiny-llama")
    base = perplexity(lm, [TEXT], window=48, max_tokens=48)
    with pytest.raises(ValueError, match="not a mixture of experts"):
        routing_sweep(lm, base, [0.1])
