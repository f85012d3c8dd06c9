"""Importance metrics on tiny random models: hand-checkable against plain autograd."""

from __future__ import annotations

import pytest
import torch
import transformers

from esa_pipeline.core.importance.metrics import (
    ImportanceResult,
    SliceGroupScores,
    hutchinson_diagonal,
    importance_scores,
    top_k,
)
from esa_pipeline.core.models.adapters import adapter_for


def _tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def _tiny_neox() -> transformers.PreTrainedModel:
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)
    torch.manual_seed(1)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_grad_x_weight_matches_manual_autograd(llama):
    ids = _ids(3, 12)
    result = importance_scores(llama, adapter_for(llama), [ids], ("grad_x_weight",),
                               components=["ffn.down"], layers=[1])
    weight = llama.model.layers[1].mlp.down_proj.weight
    weight.requires_grad_(True)
    try:
        # HF's loss is the mean NLL over all B*(T-1) targets: the L the metric differentiates
        (grad,) = torch.autograd.grad(llama(input_ids=ids, labels=ids).loss, [weight])
    finally:
        weight.requires_grad_(False)
    expected = (grad * weight).abs()
    torch.testing.assert_close(result.scores_for("grad_x_weight", "ffn.down", 1)[0], expected,
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("estimator", ["token", "window"])
def test_grad_sq_is_per_token_fisher_on_single_token_windows(llama, estimator):
    # windows of 2 tokens score exactly one target each, so with one window per backward both estimators
    # must equal (1/N) Σ_t g_t² exactly (r_t² = 1)
    ids = _ids(5, 2, seed=3)
    result = importance_scores(llama, adapter_for(llama), [ids], ("grad_sq",), components=["norm.input"],
                               layers=[0], fisher_estimator=estimator, batch_size=1)
    weight = llama.model.layers[0].input_layernorm.weight
    weight.requires_grad_(True)
    try:
        per_token = [torch.autograd.grad(llama(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss,
                                         [weight])[0] for i in range(5)]
    finally:
        weight.requires_grad_(False)
    expected = torch.stack(per_token).pow(2).mean(0)
    torch.testing.assert_close(result.scores_for("grad_sq", "norm.input", 0)[0], expected, rtol=1e-4,
                               atol=1e-10)


def test_hutchinson_converges_to_exact_diagonal_on_a_quadratic():
    torch.manual_seed(0)
    root = torch.randn(6, 6)
    hessian = root @ root.T + torch.eye(6)  # [6, 6] symmetric
    x = torch.randn(6, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * x @ hessian @ x, [x], create_graph=True)
    samples = 1500
    (estimate,) = hutchinson_diagonal([grad], [x], samples, torch.Generator().manual_seed(1))
    # one sample v_i (Hv)_i has variance Σ_{j≠i} H_ij²: allow 4 standard errors
    off_diagonal = hessian.pow(2).sum(1) - hessian.diagonal().pow(2)
    assert ((estimate - hessian.diagonal()).abs() < 4 * (off_diagonal / samples).sqrt()).all()
    (grad,) = torch.autograd.grad(0.5 * x @ hessian @ x, [x], create_graph=True)  # graph freed above
    (rough,) = hutchinson_diagonal([grad], [x], 1, torch.Generator().manual_seed(1))
    assert (rough - hessian.diagonal()).abs().max() > (estimate - hessian.diagonal()).abs().max()


def _exact_hessian(model, ids, weight) -> torch.Tensor:
    """Full Hessian of the mean NLL w.r.t. a small parameter, one double backprop per element."""
    weight.requires_grad_(True)
    try:
        model.set_attn_implementation("eager")
        (grad,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [weight], create_graph=True)
        return torch.stack([torch.autograd.grad(grad[i], [weight], retain_graph=True)[0]
                            for i in range(grad.numel())])  # [n, n]
    finally:
        model.set_attn_implementation("sdpa")
        weight.requires_grad_(False)


def test_hutchinson_on_a_model_matches_the_exact_hessian_diagonal(llama):
    ids = _ids(1, 10, seed=5)
    samples = 60
    result = importance_scores(llama, adapter_for(llama), [ids], ("hutchinson",), components=["norm.input"],
                               layers=[1], hutchinson_samples=samples)
    hessian = _exact_hessian(llama, ids, llama.model.layers[1].input_layernorm.weight)  # [32, 32]
    exact = hessian.diagonal()
    estimate = result.scores_for("hutchinson", "norm.input", 1)[0]
    off_diagonal = hessian.pow(2).sum(1) - exact.pow(2)
    assert ((estimate - exact).abs() < 5 * (off_diagonal / samples).sqrt()).all()
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.85


def test_model_state_is_restored_after_scoring(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    importance_scores(llama, adapter_for(llama), [_ids(2, 8)], components=["attention.query", "norm.input"],
                      layers=[0], hutchinson_samples=1)
    for n, p in llama.named_parameters():
        assert torch.equal(p, before[n]), n
        assert not p.requires_grad and p.grad is None, n
    assert not llama.training
    assert llama.config._attn_implementation == "sdpa"


def test_model_state_is_restored_when_scoring_fails(llama):
    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = llama.model.layers[1].mlp.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            importance_scores(llama, adapter_for(llama), [_ids(1, 8)], ("hutchinson", "activation"),
                              components=["ffn.up"], layers=[0])
    finally:
        handle.remove()
    assert all(not p.requires_grad and p.grad is None for p in llama.parameters())
    assert llama.config._attn_implementation == "sdpa"
    assert not llama.model.layers[0].mlp.up_proj._forward_hooks  # activation hooks removed


def test_activation_score_is_weight_times_input_rms(llama):
    ids = _ids(2, 8)
    captured = []
    handle = llama.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        result = importance_scores(llama, adapter_for(llama), [ids], ("activation",), components=["ffn.down"],
                                   layers=[0])
    finally:
        handle.remove()
    rms = torch.cat(captured).pow(2).mean(0).sqrt()  # [intermediate]
    expected = llama.model.layers[0].mlp.down_proj.weight.abs() * rms
    torch.testing.assert_close(result.scores_for("activation", "ffn.down", 0)[0], expected)


def test_top_k_indexes_the_right_elements_of_a_fused_parameter():
    model = _tiny_neox()
    adapter = adapter_for(model)
    result = importance_scores(model, adapter, [_ids(1, 8)], ("magnitude",), components=["attention.key"],
                               layers=[1])
    rows = top_k(result, 5, "layer")
    qkv = model.gpt_neox.layers[1].attention.query_key_value
    head_dim = 32 // 4
    for r in rows.itertuples():
        param = model.get_parameter(r.param_name)
        assert param.view(-1)[r.flat_index].abs().item() == pytest.approx(r.score)
        if r.param_name.endswith("weight"):
            assert qkv.weight[r.row, r.col].abs().item() == pytest.approx(r.score)
            assert (r.row % (3 * head_dim)) // head_dim == 1  # part 1 of the interleaved QKV = key
    # top-1 is the largest-magnitude key weight or bias element
    key_weight = qkv.weight.view(4, 3, head_dim, 32)[:, 1]
    key_bias = qkv.bias.view(4, 3, head_dim)[:, 1]
    assert rows.iloc[0].score == pytest.approx(max(key_weight.abs().max().item(), key_bias.abs().max().item()))
    assert list(rows["rank"]) == [1, 2, 3, 4, 5]


def test_top_k_scopes_on_hand_made_scores():
    from esa_pipeline.core.models.adapters import ParamSlice

    a = SliceGroupScores("ffn.down", 0, None, [ParamSlice("a.weight", None, (), 1)],
                         {"magnitude": [torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.5, 9.0]])]})
    b = SliceGroupScores("ffn.down", 1, None, [ParamSlice("b.weight", None, (slice(1, 3),), 1)],
                         {"magnitude": [torch.tensor([[7.0, 0.1, 0.2], [0.3, 0.4, 3.0]])]})
    result = ImportanceResult("m", ("magnitude",), [a, b], 1, 1, "token", 0, 0,
                              param_shapes={"a.weight": (2, 3), "b.weight": (3, 3)})
    per_layer = top_k(result, 2, "layer")
    assert per_layer[["layer", "row", "col", "rank"]].astype(int).values.tolist() == [
        [0, 1, 2, 1], [0, 0, 1, 2], [1, 1, 0, 1], [1, 2, 2, 2]]  # b's slice starts at row 1 of its param
    glob = top_k(result, 3, "global")
    assert glob["score"].tolist() == [9.0, 7.0, 5.0]
    assert glob["flat_index"].tolist() == [5, 3, 1]
    with pytest.raises(ValueError, match="scope"):
        top_k(result, 2, "model")


def test_bad_input_raises_clear_errors(llama):
    adapter = adapter_for(llama)
    with pytest.raises(ValueError, match="unknown metrics"):
        importance_scores(llama, adapter, [_ids(1, 4)], ("saliency",), components=["ffn.up"], layers=[0])
    with pytest.raises(ValueError, match="not applicable"):
        importance_scores(llama, adapter, [_ids(1, 4)], ("magnitude",), components=["moe.router"], layers=[0])
    with pytest.raises(TypeError, match="token-id"):
        importance_scores(llama, adapter, [torch.randn(1, 4)], ("magnitude",), components=["ffn.up"], layers=[0])


def test_top_k_refuses_non_finite_scores_instead_of_ranking_them_first():
    # torch.topk put a NaN score at rank 1: weight_importance stored "the most important weight" with score NaN
    from esa_pipeline.core.models.adapters import ParamSlice

    a = SliceGroupScores("ffn.down", 0, None, [ParamSlice("a.weight", None, (), 1)],
                         {"grad_sq": [torch.tensor([[0.0, float("nan"), 1.0], [2.0, 0.5, 9.0]])]})
    result = ImportanceResult("m", ("grad_sq",), [a], 1, 1, "token", 0, 0, param_shapes={"a.weight": (2, 3)})
    with pytest.raises(ValueError, match=r"grad_sq has 1 non-finite score \(NaN/inf\), the first in ffn.down layer 0"):
        top_k(result, 2, "layer")
