import math

import pytest
import torch

from esa_pipeline.core.evaluation.paired import evaluate_against, kl_on_support, ratio_estimator_se
from esa_pipeline.core.evaluation.perplexity import full_forward, perplexity
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed


@pytest.fixture(scope="module")
def smollm2_base(smollm2):
    base = perplexity(smollm2, load_texts("bundled", max_docs=1), window=64, max_tokens=128, batch_size=2)
    return base, PrefixCache.build(smollm2, base, adapter_for(smollm2.model))


def test_tiny_sigma_changes_nothing_and_large_sigma_a_lot(smollm2, smollm2_base):
    base, cache = smollm2_base
    tiny_noise = evaluate_against(smollm2, base, Perturbation("gaussian", "ffn.down", 0, 1e-6, 1337), cache=cache)
    assert tiny_noise.restored is True and tiny_noise.changed_fraction > 0.5  # fp32 stores a 1e-6 change
    assert abs(tiny_noise.delta_nll) < 1e-4 and tiny_noise.ppl_ratio == pytest.approx(1.0, abs=1e-4)
    assert tiny_noise.top1_agreement > 0.99 and 0 <= tiny_noise.kl < 1e-6
    assert tiny_noise.relative_change == pytest.approx(1e-6, rel=0.05)

    big = evaluate_against(smollm2, base, Perturbation("gaussian", "ffn.down", 0, 1.0, 1337), cache=cache)
    assert big.delta_nll > 0.5 and big.ppl_ratio > 1.6 and big.kl > 0.3 and big.top1_agreement < 0.7
    assert big.ppl_ratio_se > 0 and math.isfinite(big.ppl_ratio_se)
    assert big.relative_change == pytest.approx(1.0, rel=0.05)


def test_metrics_are_consistent_with_their_definitions(tiny):
    lm = tiny("tiny-llama")
    base = perplexity(lm, load_texts("bundled", max_docs=2), window=48, max_tokens=240, batch_size=2)
    result = evaluate_against(lm, base, Perturbation("gaussian", "attention.output", 1, 0.8, 7))
    assert result.n_tokens == base.n_tokens and not result.nonfinite and result.restored
    assert result.delta_nll == pytest.approx((result.nll_sum - base.nll_sum) / base.n_tokens, rel=1e-9, abs=1e-12)
    assert result.ppl_ratio == pytest.approx(math.exp(result.delta_nll))
    assert result.token_ppl == pytest.approx(base.token_ppl * result.ppl_ratio, rel=1e-9)
    frame = result.windows
    assert frame.window_id.tolist() == base.windows.window_id.tolist()
    assert frame.delta_nll_sum.sum() / frame.n_tokens.sum() == pytest.approx(result.delta_nll, rel=1e-9)
    assert (frame.nll_sum - base.windows.nll_sum).tolist() == pytest.approx(frame.delta_nll_sum.tolist(), abs=1e-9)
    assert result.ppl_ratio_se == pytest.approx(
        result.ppl_ratio * ratio_estimator_se(frame.delta_nll_sum.tolist(), frame.n_tokens.tolist(), result.delta_nll)
    )


def test_kl_is_exact_for_a_small_vocabulary(tiny):
    lm = tiny("tiny-pythia")
    base = perplexity(lm, ["a short text to score with the whole distribution"], window=64)
    assert base.kl_support == "full"
    adapter = adapter_for(lm.model)
    p = Perturbation("gaussian", "ffn.up", 0, 1.0, 11)
    result = evaluate_against(lm, base, p, adapter=adapter)
    (batch,) = base.batches()
    start, stop = batch.spans[0]
    base_lp = full_forward(lm.model, batch)[0, start:stop].float().log_softmax(-1).double()  # [n, V]
    with perturbed(lm.model, adapter, p):
        pert_lp = full_forward(lm.model, batch)[0, start:stop].float().log_softmax(-1).double()  # [n, V]
    exact = (base_lp.exp() * (base_lp - pert_lp)).sum(-1).mean()
    assert result.kl == pytest.approx(float(exact), rel=1e-4)
    assert result.top1_agreement == pytest.approx(float((base_lp.argmax(-1) == pert_lp.argmax(-1)).double().mean()))


def test_topk_kl_renormalises_on_the_baseline_support():
    p = torch.log(torch.tensor([[0.5, 0.3]]))  # baseline top-2 (of a larger vocab) -> 0.625, 0.375
    q = torch.log(torch.tensor([[0.2, 0.2]]))  # perturbed on the same ids -> 0.5, 0.5
    expected = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    assert kl_on_support(p, q) == pytest.approx(expected)
    assert kl_on_support(p, p) == pytest.approx(0.0, abs=1e-12)


def test_ratio_estimator_se():
    # the same per-token difference in every window: no uncertainty
    assert ratio_estimator_se([2.0, 4.0, 6.0], [10, 20, 30], 0.2) == pytest.approx(0.0, abs=1e-12)
    # equal window sizes: it is the standard error of the window means
    window_means = torch.tensor([0.1, 0.3, 0.2, 0.6], dtype=torch.float64)
    se = ratio_estimator_se((window_means * 50).tolist(), [50] * 4, float(window_means.mean()))
    assert se == pytest.approx(float(window_means.std() / 2.0))
    assert math.isnan(ratio_estimator_se([1.0], [10], 0.1))


def test_nonfinite_loss_is_recorded_not_raised(tiny):
    lm = tiny("tiny-mistral")
    base = perplexity(lm, ["text that will meet an infinite weight"], window=32)
    adapter = adapter_for(lm.model)
    # a norm gain of 1e20 overflows fp32 activations: inf - inf -> NaN logits
    boom = Perturbation("scale", "norm.input", 0, 1e20, 1)
    for cache in (None, PrefixCache.build(lm, base, adapter)):
        result = evaluate_against(lm, base, boom, adapter=adapter, cache=cache)
        assert result.nonfinite and result.restored is True
        for value in (result.delta_nll, result.ppl_ratio, result.ppl_ratio_se, result.kl, result.top1_agreement):
            assert math.isnan(value)
    # and the model is intact afterwards
    again = perplexity(lm, ["text that will meet an infinite weight"], window=32)
    assert again.nll_sum == base.nll_sum
