import math

import numpy as np
import pytest
import torch

from esa_pipeline.core.evaluation.paired import clustered_ratio_se, evaluate_against, ratio_estimator_se
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import _kl_and_lower_bound, gather_scored
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed


@pytest.fixture(scope="module")
def smollm2_base(smollm2):
    base = perplexity(smollm2, load_texts("bundled", max_docs=3), window=64, max_tokens=192, batch_size=2)
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
    assert frame.doc_id.tolist() == base.windows.doc_id.tolist() and frame.doc_id.nunique() == 2
    assert result.ppl_ratio_se == pytest.approx(
        result.ppl_ratio * clustered_ratio_se(frame.delta_nll_sum.tolist(), frame.n_tokens.tolist(),
                                              frame.doc_id.tolist(), result.delta_nll)
    )


def brute_force_kl(lm, base, adapter, p) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(baseline || perturbed) and top-1 agreement from the model's own full logits, in fp64."""
    kls, agree = [], []
    for batch in base.batches():
        with torch.inference_mode():
            base_lp = gather_scored(lm.model(input_ids=batch.input_ids).logits, batch).double().log_softmax(-1)
            with perturbed(lm.model, adapter, p):
                pert_lp = gather_scored(lm.model(input_ids=batch.input_ids).logits, batch).double().log_softmax(-1)
        kls.append((base_lp.exp() * (base_lp - pert_lp)).sum(-1))
        agree.append(base_lp.argmax(-1) == pert_lp.argmax(-1))
    return torch.cat(kls), torch.cat(agree)


@pytest.mark.parametrize("component,strength", [("ffn.down", 0.05), ("attention.value", 0.5), ("ffn.up", 2.0)])
def test_kl_is_the_exact_full_vocabulary_kl_on_smollm2(smollm2, smollm2_base, component, strength):
    base, cache = smollm2_base
    adapter = cache.adapter
    p = Perturbation("gaussian", component, 20, strength, 1337)
    result = evaluate_against(smollm2, base, p, cache=cache)
    kl, agree = brute_force_kl(smollm2, base, adapter, p)
    assert result.kl == pytest.approx(float(kl.mean()), rel=1e-5)
    assert result.top1_agreement == pytest.approx(float(agree.double().mean()))
    assert 0 <= result.kl_lower_bound_topk <= result.kl


def test_kl_of_a_tied_head_perturbation_uses_the_original_head_for_the_baseline(tiny):
    lm = tiny("tiny-llama")
    adapter = adapter_for(lm.model)
    assert adapter.tied_embeddings
    base = perplexity(lm, ["a short text for the tied head"], window=64)
    p = Perturbation("gaussian", "embedding", None, 0.5, 3)
    result = evaluate_against(lm, base, p, adapter=adapter)
    kl, _ = brute_force_kl(lm, base, adapter, p)
    assert result.kl == pytest.approx(float(kl.mean()), rel=1e-5) and result.kl > 0


def test_kl_lower_bound_is_the_kl_of_the_top_k_plus_rest_coarsening():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.2, 0.1, 0.5]], dtype=torch.float64)
    exact, bound = _kl_and_lower_bound(p.log(), q.log(), k=2)
    assert float(exact) == pytest.approx(float((p * (p / q).log()).sum()))
    # buckets {0}, {1}, rest {2, 3}: p = (0.5, 0.3, 0.2), q = (0.2, 0.2, 0.6)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    assert float(bound) == pytest.approx(expected) and float(bound) <= float(exact)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=generator, dtype=torch.float64) * 3
    p_log, q_log = logits[:100].log_softmax(-1), logits[100:].log_softmax(-1)
    exact, bound = _kl_and_lower_bound(p_log, q_log, k=5)
    assert bool((bound <= exact).all()) and bool((bound >= 0).all())


def test_kl_keeps_its_relative_precision_when_tiny():
    """A small perturbation's KL (1e-13 .. 1) against an 80-bit extended-precision reference: computing it as
    log Σ p e^(x - x̄) lost it to the rounding of a sum near 1 (relative error ~1e-4 at 1e-13)."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 2000, generator=generator) * 3  # [c, V] fp32 logits, as the head gives them
    for scale in (1e-6, 1e-4, 1e-2, 1.0):
        b = a + scale * torch.randn(4, 2000, generator=generator)
        exact, bound = _kl_and_lower_bound(a, b, k=32)
        for row in range(4):
            la = a[row].numpy().astype(np.longdouble)
            lb = b[row].numpy().astype(np.longdouble)
            la, lb = la - np.log(np.exp(la - la.max()).sum()) - la.max(), lb - np.log(np.exp(lb - lb.max()).sum()) - lb.max()
            reference = float((np.exp(la) * (la - lb)).sum())
            assert float(exact[row]) == pytest.approx(reference, rel=1e-7), scale
        assert bool((bound <= exact * (1 + 1e-9)).all()) and bool((bound >= 0).all())


def test_kl_of_a_catastrophic_point_is_finite_when_the_true_kl_is():
    """Logit shifts beyond ~709 nats overflowed e^y in fp64: the KL of such a point (hundreds of nats, finite)
    was stored as inf, or nan where p underflowed to 0 (0 * inf), and its lower bound with it."""
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(3, 1000, generator=generator) * 3  # [c, V] fp32 baseline logits
    a[2, 7] = -900.0  # p underflows to exactly 0 in fp64 at this token ...
    b = torch.randn(3, 1000, generator=generator) * 300
    b[2, 7] = 500.0  # ... where the perturbed model puts nearly all its mass
    exact, bound = _kl_and_lower_bound(a, b, k=32)
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    reference = (la.exp() * (la - lb)).sum(-1)  # [c] direct fp64 sum: no overflow at these magnitudes
    assert bool(torch.isfinite(exact).all()) and bool((reference > 500).all())
    assert exact.tolist() == pytest.approx(reference.tolist(), rel=1e-6)  # the shift b - a is taken in fp32
    assert bool((bound <= exact * (1 + 1e-9)).all()) and bool((bound >= 0).all())
    # a perturbed model that gives 0 probability where the baseline does not is still inf
    b[0, int(a[0].argmax())] = -math.inf
    assert math.isinf(float(_kl_and_lower_bound(a, b, k=32)[0][0]))


def test_clustered_se_treats_documents_as_the_units():
    # two windows of document a, one of b: the SE is the ratio-estimator SE of the per-document sums
    se = clustered_ratio_se([1.0, 3.0, 0.5], [10, 10, 10], ["a", "a", "b"], 4.5 / 30)
    assert se == pytest.approx(ratio_estimator_se([4.0, 0.5], [20, 10], 4.5 / 30))
    assert math.isnan(clustered_ratio_se([1.0, 3.0], [10, 10], ["a", "a"], 0.2))  # one document: not estimable


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
