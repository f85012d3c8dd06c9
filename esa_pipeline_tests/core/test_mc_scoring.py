"""The project's multiple-choice scorer against lm-eval 0.4.13, the merged-join case, and zero-shot points."""

import numpy as np
import pytest

from esa_pipeline.core.evaluation.mc_scoring import (
    EmptyContinuation,
    LmEvalTokenization,
    RequestBatches,
    score_requests,
)
from esa_pipeline.core.evaluation.zeroshot import BUNDLED_TASKS, load_tasks, zero_shot
from esa_pipeline.core.evaluation.zeroshot_points import McSuite, task_items, zero_shot_points
from esa_pipeline.core.perturbation.perturb import Perturbation

# Prompt formats of the seed tasks (lm-eval's hellaswag / piqa / boolq / arc_easy templates), with text written
# for this test: their datasets are not available offline, their formats are.
SEED_STYLE_REQUESTS = [
    # hellaswag: "<activity>: <ctx_a> <Ctx_b>" + " <ending>"
    ("Making tea: A woman fills a kettle with water and sets it on the stove. She", " waits for the water to boil."),
    ("Making tea: A woman fills a kettle with water and sets it on the stove. She", " paints the kettle bright red."),
    # piqa: "Question: <goal>\nAnswer:" + " <solution>"
    ("Question: How do you keep bread from going stale quickly?\nAnswer:", " Store it in a sealed bag."),
    ("Question: How do you keep bread from going stale quickly?\nAnswer:", " Leave it open on a sunny windowsill."),
    # boolq: "<passage>\nQuestion: <question>?\nAnswer:" + " no" / " yes"
    ("The canal was dug by hand over eleven years.\nQuestion: was the canal dug by machine?\nAnswer:", " no"),
    ("The canal was dug by hand over eleven years.\nQuestion: was the canal dug by machine?\nAnswer:", " yes"),
    # arc_easy: "Question: <question>\nAnswer:" + " <choice text>"
    ("Question: Which tool is best for measuring the length of a table?\nAnswer:", " a tape measure"),
    ("Question: Which tool is best for measuring the length of a table?\nAnswer:", " a thermometer"),
    # few-shot context, a context ending in a space (moved to the continuation), an empty context (prefix token)
    ("Question: What is 2 + 2?\nAnswer: 4\n\nQuestion: What is 3 + 3?\nAnswer:", " 6"),
    ("The capital of France is ", "Paris"),
    ("", "The sun rises in the east."),
]


@pytest.fixture(scope="module")
def hflm(smollm2):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=1)


def _instances(requests):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, r, i, ("t", i, 1)) for i, r in enumerate(requests)]


def _ours(smollm2, requests, batch_size=1):
    tokenization = LmEvalTokenization(smollm2.tokenizer, smollm2.model)
    encoded = [tokenization.encode_request(f"r{i}", *r) for i, r in enumerate(requests)]
    batches = RequestBatches.build(encoded, tokenization.max_length, batch_size, tokenization.prefix_token_id)
    return encoded, score_requests(smollm2.model, batches)


def test_merged_join_gets_the_right_log_likelihood_never_zero(smollm2, hflm) -> None:
    tokenization = LmEvalTokenization(smollm2.tokenizer, smollm2.model)
    # lm-eval's own split leaves the continuation without tokens ("Ans" + "wer" is the single token "Answer")
    assert tokenization.lm_eval_pair("Ans", "wer")[1] == []
    encoded, scores = _ours(smollm2, [("Ans", "wer"), ("Question: 1 + 1 =", " 2")], batch_size=2)
    assert encoded[0].join_merged and encoded[0].continuation_enc == tuple(smollm2.tokenizer.encode("wer"))
    assert scores.loglikelihood[0] == pytest.approx(-12.461, abs=2e-3)
    assert not encoded[1].join_merged


def test_an_empty_continuation_is_an_error_naming_the_item(smollm2) -> None:
    tokenization = LmEvalTokenization(smollm2.tokenizer, smollm2.model)
    with pytest.raises(EmptyContinuation, match="esa_x/item7/choice2"):
        tokenization.encode_request("esa_x/item7/choice2", "Question: why?\nAnswer:", "")


def test_every_bundled_item_is_tokenized_as_lm_eval_does(smollm2, hflm) -> None:
    tokenization = LmEvalTokenization(smollm2.tokenizer, smollm2.model)
    items, requests = task_items(load_tasks(list(BUNDLED_TASKS)), limit=None)
    assert {i.task for i in items} == set(BUNDLED_TASKS) and len(items) >= 400
    for key, context, continuation in requests:
        theirs = hflm._encode_pair(context, continuation)
        assert tokenization.lm_eval_pair(context, continuation) == (theirs[0], theirs[1]), key
        encoded = tokenization.encode_request(key, context, continuation)
        assert not encoded.join_merged, key  # no bundled item merges at the join
        assert (list(encoded.context_enc), list(encoded.continuation_enc)) == (theirs[0], theirs[1]), key


def test_log_likelihoods_equal_lm_eval_on_bundled_tasks_and_seed_formats(smollm2, hflm) -> None:
    requests = list(SEED_STYLE_REQUESTS)
    for task in BUNDLED_TASKS:  # the first 5 items of every bundled task (all their choices)
        _, task_requests = task_items(load_tasks([task]), limit=5)
        requests += [(context, continuation) for _, context, continuation in task_requests]
    theirs = np.array([ll for ll, _ in hflm.loglikelihood(_instances(requests), disable_tqdm=True)])
    theirs_greedy = [g for _, g in hflm.loglikelihood(_instances(requests), disable_tqdm=True)]
    _, ours = _ours(smollm2, requests, batch_size=1)
    assert np.all(theirs < 0)
    np.testing.assert_allclose(ours.loglikelihood, theirs, rtol=1e-5, atol=0)
    assert ours.is_greedy.tolist() == theirs_greedy
    # batching (padding, shared inputs of one-token answers) changes nothing beyond float noise
    _, batched = _ours(smollm2, requests, batch_size=8)
    np.testing.assert_allclose(batched.loglikelihood, theirs, rtol=2e-5, atol=1e-5)


def test_suite_accuracy_equals_lm_eval_accuracy(tiny) -> None:
    lm = tiny("tiny-llama")
    suite = McSuite.build(lm, ["esa_mc", "esa_reading"], limit=10, batch_size=4)
    rows = zero_shot(lm, ["esa_mc", "esa_reading"], limit=10)
    for task in ("esa_mc", "esa_reading"):
        mask = np.array([i.task == task for i in suite.items])
        for metric, ours in (("acc", suite.outcomes.correct), ("acc_norm", suite.outcomes.correct_norm)):
            expected = rows.loc[(rows["task"] == task) & (rows["metric"] == metric), "value"].item()
            assert ours[mask].mean() == pytest.approx(expected), (task, metric)


def test_points_are_restored_paired_and_equal_with_or_without_prefix_cache(tiny) -> None:
    lm = tiny("tiny-llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    specs = [Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=2.0, seed=3),
             Perturbation(kind="gaussian", component="attention.query", layer=0, strength=2.0, seed=3)]  # fmt: skip
    cached = McSuite.build(lm, ["esa_mc"], limit=12, batch_size=4)
    assert cached.cache is not None and cached.cache.enabled
    rows = zero_shot_points(cached, specs)
    assert len(rows) == 2 * 12 and rows["restored"].all() and rows["used_prefix_cache"].all()
    assert rows.groupby("layer")["item_id"].nunique().tolist() == [12, 12]
    # the baseline side is the same for every point; the perturbed side changes some margins
    assert (rows.groupby("item_id")["margin_before"].nunique() == 1).all()
    assert (rows["margin_after"] != rows["margin_before"]).any()
    plain = zero_shot_points(McSuite.build(lm, ["esa_mc"], limit=12, batch_size=3, use_prefix_cache=False), specs)
    assert not plain["used_prefix_cache"].any()
    np.testing.assert_allclose(plain["margin_after"], rows["margin_after"], rtol=1e-4, atol=1e-5)
    assert plain["correct_after"].tolist() == rows["correct_after"].tolist()
    again = zero_shot_points(cached, specs)  # deterministic specs: the same point gives the same rows
    assert again["margin_after"].tolist() == rows["margin_after"].tolist()
    for name, p in lm.model.named_parameters():
        assert torch_equal(p, before[name]), name


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_the_head_runs_only_at_answer_positions_with_the_full_forwards_values(tiny) -> None:
    # A full [B, T, V] head over every context position was most of Gemma-3's (262k-token head) scoring time.
    import torch

    from esa_pipeline.core.models.adapters import adapter_for

    lm = tiny("tiny-llama")
    adapter = adapter_for(lm.model)
    tokenization = LmEvalTokenization(lm.tokenizer, lm.model)
    _, raw = task_items(load_tasks(["esa_reading"]), limit=4)
    requests = [tokenization.encode_request(*r) for r in raw]
    batches = RequestBatches.build(requests, tokenization.max_length, 4, tokenization.prefix_token_id)
    head_rows = []
    head = adapter.head_logits
    adapter.head_logits = lambda model, hidden: (head_rows.append(hidden.shape[0]), head(model, hidden))[1]
    scores = score_requests(lm.model, batches, adapter=adapter)
    assert sum(head_rows) == sum(len(w.target_ids) for w in batches.windows) == sum(len(r.continuation_enc) for r in requests)
    assert sum(head_rows) * 5 < sum(len(w.input_ids) for w in batches.windows)
    # the values of the model's own full forward, request by request
    expected = []
    with torch.inference_mode():
        for r in requests:
            logits = lm.model(input_ids=torch.tensor([r.context_enc + r.continuation_enc[:-1]])).logits[0].float()
            logprobs = torch.log_softmax(logits[-len(r.continuation_enc) :], dim=-1)
            expected.append(float(logprobs.gather(-1, torch.tensor(r.continuation_enc)[:, None]).sum()))
    np.testing.assert_allclose(scores.loglikelihood, expected, rtol=1e-5, atol=1e-6)


def test_an_item_with_non_finite_log_likelihoods_has_no_answer_and_counts_as_wrong(tiny, monkeypatch) -> None:
    # An overflowed point (NaN log-likelihoods; `top_delta_nll` picks non-finite sweep points first) was scored by
    # np.argmax, which returns the first NaN's index: the model "answered" choice 0 and was "correct" on every item
    # whose gold is 0, a number standing in for no answer.
    import dataclasses

    import esa_pipeline.core.evaluation.zeroshot_points as zp
    from esa_pipeline.core.analysis.zero_shot_stats import zero_shot_summary

    lm = tiny("tiny-llama")
    suite = McSuite.build(lm, ["esa_mc"], limit=8, batch_size=4)
    real = zp.score_requests

    def overflowed(*args, **kwargs):
        scores = real(*args, **kwargs)
        ll = scores.loglikelihood.copy()
        ll[: len(ll) // 2] = np.nan  # the first half of the requests: NaN (items 0..3 at least partly)
        ll[len(ll) // 2 :] = -np.inf  # the rest: every choice -inf, no ranking either
        return dataclasses.replace(scores, loglikelihood=ll)

    monkeypatch.setattr(zp, "score_requests", overflowed)
    rows = zero_shot_points(suite, [Perturbation(kind="gaussian", component="ffn.down", layer=1, strength=0.1,
                                                 seed=3)])  # fmt: skip
    assert rows["pred_after"].isna().all() and str(rows["pred_after"].dtype) == "Int64"
    assert not rows["correct_after"].any() and not rows["correct_norm_after"].any()
    assert rows["margin_after"].isna().all()
    assert rows["pred_before"].notna().all()  # the baseline answered
    summary = zero_shot_summary(rows).iloc[0]
    assert summary["n_lost"] == int(rows["correct_before"].sum()) and summary["n_gained"] == 0
    assert summary["accuracy_after"] == 0.0
    assert "8 items had non-finite log-likelihoods after the perturbation (no answer): counted as wrong" in summary["note"]
