"""Zero-shot evaluation through lm-eval: the bundled esa_mc task, result rows, and the no-request-cache rule."""

import json
import math
from collections import Counter

import pytest
import torch

from esa_pipeline.core.evaluation.zeroshot import (
    BUNDLED_TASKS,
    RESULT_COLUMNS,
    SEED_TASKS,
    UnknownZeroShotTask,
    ZeroShotTaskUnavailable,
    bundled_task_config,
    bundled_tasks_dir,
    load_tasks,
    zero_shot,
)

ESA_MC_JSONL = bundled_tasks_dir() / "esa_mc" / "esa_mc.jsonl"


def _items() -> list[dict]:
    return [json.loads(line) for line in ESA_MC_JSONL.read_text().splitlines() if line.strip()]


def _chance_rate(n_items: int) -> float:
    # lm-eval's `limit` scores the first n items in file order.
    items = _items()[:n_items]
    return sum(1 / len(item["choices"]) for item in items) / len(items)


def _metrics(rows) -> dict[str, dict]:
    return {row["metric"]: row for row in rows.to_dict("records")}


# ---- the bundled task ---------------------------------------------------------------------------------
def test_esa_mc_items_are_well_formed() -> None:
    items = _items()
    assert len(items) >= 120
    questions = Counter(item["question"].strip().lower() for item in items)
    assert not [q for q, n in questions.items() if n > 1], "duplicate questions"
    assert len({item["id"] for item in items}) == len(items), "duplicate ids"
    for item in items:
        choices = item["choices"]
        assert 2 <= len(choices) <= 4, item
        assert all(isinstance(c, str) and c.strip() for c in choices), item
        assert len(set(choices)) == len(choices), f"repeated choice: {item}"
        assert isinstance(item["label"], int) and 0 <= item["label"] < len(choices), item
        assert item["question"].strip(), item


def test_esa_mc_mixes_choice_counts_and_balances_answer_positions() -> None:
    items = _items()
    by_size = Counter(len(item["choices"]) for item in items)
    assert set(by_size) == {2, 3, 4} and min(by_size.values()) >= 20, by_size
    for size in by_size:
        positions = Counter(item["label"] for item in items if len(item["choices"]) == size)
        assert set(positions) == set(range(size)), (size, positions)
        assert max(positions.values()) - min(positions.values()) <= 2, (size, positions)


def test_bundled_tasks_are_discovered_from_their_yaml() -> None:
    assert set(BUNDLED_TASKS) == {"esa_mc", "esa_knowledge", "esa_commonsense", "esa_reading"}
    config = bundled_task_config("esa_mc")
    assert config["output_type"] == "multiple_choice" and config["dataset_path"] == "json"
    assert {m["metric"] for m in config["metric_list"]} == {"acc", "acc_norm"}


def test_esa_mc_loads_through_lm_eval_from_any_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the YAML's repo-relative data path must not depend on the cwd
    task = load_tasks(["esa_mc"])["esa_mc"]
    docs = list(task.test_docs())
    items = _items()
    assert len(docs) == len(items)
    for doc, item in zip(docs, items, strict=True):
        assert task.doc_to_choice(doc) == item["choices"]
        assert task.doc_to_target(doc) == item["label"]
        text = task.doc_to_text(doc)
        if item["question"].endswith("?"):
            assert text == f"Question: {item['question']}\nAnswer:"
        else:
            assert text == item["question"]


# ---- zero_shot on a tiny random model -------------------------------------------------------------------
def test_zero_shot_returns_finite_rows_and_leaves_model_and_tokenizer_as_found(tiny) -> None:
    lm = tiny("tiny-llama")
    weights_before = {name: p.detach().clone() for name, p in lm.model.state_dict().items()}
    pad_before = lm.tokenizer.pad_token
    rows = zero_shot(lm, ["esa_mc"], limit=8)

    assert list(rows.columns) == RESULT_COLUMNS
    assert sorted(rows["metric"]) == ["acc", "acc_norm"]
    for row in rows.to_dict("records"):
        assert row["model"] == "tiny-llama" and row["task"] == "esa_mc"
        assert 0.0 <= row["value"] <= 1.0
        assert math.isfinite(row["stderr"]) and row["stderr"] > 0
        assert row["n_items"] == 8 and row["num_fewshot"] == 0 and row["random_weights"] is True
    assert not lm.model.training
    assert lm.tokenizer.pad_token == pad_before
    after = lm.model.state_dict()
    assert all(torch.equal(after[name], weights_before[name]) for name in weights_before)


def test_zero_shot_gives_the_numbers_of_lm_eval_simple_evaluate(tiny) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = tiny("tiny-llama")
    ours = _metrics(zero_shot(lm, ["esa_mc"], limit=12))
    reference = simple_evaluate(
        HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=8),
        tasks=[bundled_task_config("esa_mc")],
        limit=12,
        use_cache=None,
        cache_requests=False,
        log_samples=False,
        task_manager=TaskManager(include_path=str(bundled_tasks_dir()), include_defaults=False),
    )["results"]["esa_mc"]
    for metric in ("acc", "acc_norm"):
        assert ours[metric]["value"] == reference[f"{metric},none"]
        assert ours[metric]["stderr"] == reference[f"{metric}_stderr,none"]


def test_zero_shot_records_the_number_of_shots_used(tiny) -> None:
    rows = zero_shot(tiny("tiny-llama"), ["esa_mc"], limit=4, num_fewshot=2)
    assert set(rows["num_fewshot"]) == {2}


def test_zero_shot_restores_train_mode_flag(tiny) -> None:
    lm = tiny("tiny-llama")
    lm.model.train()
    zero_shot(lm, ["esa_mc"], limit=2)
    assert lm.model.training  # lm-eval calls .eval(); the caller's mode comes back


def test_retied_head_is_reported_not_silently_changed(tiny) -> None:
    # tiny-mistral has a separate output head; a config that claims it is tied makes lm-eval's
    # `tie_weights()` replace the head by the embedding - that must be an error, not a quiet change.
    lm = tiny("tiny-mistral")
    lm.model.config.tie_word_embeddings = True
    with pytest.raises(RuntimeError, match="tie_word_embeddings"):
        zero_shot(lm, ["esa_mc"], limit=2)


@pytest.mark.parametrize(
    "kwargs",
    [{"tasks": "esa_mc"}, {"tasks": []}, {"tasks": ["esa_mc", "esa_mc"]}, {"limit": 0}, {"num_fewshot": -1},
     {"batch_size": 0}],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs) -> None:
    call = {"tasks": ["esa_mc"], **kwargs}
    with pytest.raises(ValueError):
        zero_shot(tiny("tiny-llama"), call.pop("tasks"), **call)


def test_unknown_task_lists_the_available_tasks(tiny) -> None:
    with pytest.raises(UnknownZeroShotTask, match="esa_mc") as info:
        zero_shot(tiny("tiny-llama"), ["esa_mcq"])
    assert "esa_mcq" in str(info.value) and "arc_easy" in str(info.value)


@pytest.mark.parametrize("task", SEED_TASKS)
def test_seed_task_without_cached_dataset_says_how_to_fix_it(task) -> None:
    try:
        load_tasks([task])
    except ZeroShotTaskUnavailable as error:
        message = str(error)
        assert task in message
        assert "run once with network access" in message and "experiment YAML" in message
    else:
        pytest.skip(f"{task}'s dataset is in the local HF datasets cache here")


# ---- SmolLM2: real answers, no request cache -----------------------------------------------------------
SMOLLM2_LIMIT = 24  # ~70 requests per call: seconds on an idle 2-core CPU


@pytest.fixture(scope="module")
def smollm2_baseline(smollm2):
    return _metrics(zero_shot(smollm2, ["esa_mc"], limit=SMOLLM2_LIMIT, batch_size=32))


def test_smollm2_scores_above_chance_on_esa_mc(smollm2_baseline) -> None:
    acc = smollm2_baseline["acc"]
    assert acc["n_items"] == SMOLLM2_LIMIT and acc["random_weights"] is False
    assert acc["value"] - _chance_rate(SMOLLM2_LIMIT) > 2 * acc["stderr"], acc


def test_perturbed_weights_change_the_answers_and_restoring_brings_them_back(smollm2, smollm2_baseline) -> None:
    # A request cache keyed by prompt would hand the baseline answers back for the perturbed model.
    # Negating the final norm's gain negates every logit: a drastic, exactly reversible change.
    final_norm = smollm2.model.model.norm.weight
    saved = final_norm.detach().clone()
    try:
        with torch.no_grad():
            final_norm.neg_()
        perturbed = _metrics(zero_shot(smollm2, ["esa_mc"], limit=SMOLLM2_LIMIT, batch_size=32))
    finally:
        with torch.no_grad():
            final_norm.copy_(saved)
    assert torch.equal(final_norm, saved)
    base = smollm2_baseline["acc"]
    assert base["value"] - perturbed["acc"]["value"] > 2 * base["stderr"], (base, perturbed["acc"])

    again = _metrics(zero_shot(smollm2, ["esa_mc"], limit=SMOLLM2_LIMIT, batch_size=32))
    assert {m: again[m]["value"] for m in again} == {m: smollm2_baseline[m]["value"] for m in smollm2_baseline}


@pytest.mark.parametrize("task", ["esa_knowledge", "esa_commonsense", "esa_reading"])
def test_new_bundled_tasks_are_well_formed_and_balanced(task) -> None:
    items = [json.loads(line) for line in (bundled_tasks_dir() / task / f"{task}.jsonl").read_text().splitlines()]
    assert len(items) >= 80
    assert len({i["id"] for i in items}) == len(items)
    keys = [(i.get("passage", ""), i["question"]) for i in items]
    assert len(set(keys)) == len(keys), "a question repeats"
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4, item["id"]
        assert all(c.strip() for c in item["choices"]) and 0 <= item["label"] < 4, item["id"]
    positions = Counter(i["label"] for i in items)
    assert max(positions.values()) - min(positions.values()) <= 1, positions


def test_zero_shot_points_measure_a_seed_independent_kind_once_and_stored_fixed_points_resolve() -> None:
    import pandas as pd

    from esa_pipeline.core.config import ZeroShotAt, ZeroShotGrid
    from esa_pipeline.core.evaluation.zeroshot_points import select_points
    from esa_pipeline.core.perturbation.perturb import UNUSED_SEED

    # norm scale on a grid with 2 seeds: one point per (layer, strength), not one per seed (issue 10 item 5)
    at = ZeroShotAt(grid=ZeroShotGrid(kind="scale", components=["norm.input"], layers=[0, 1], strengths=[1.1]))
    specs, _ = select_points(at, model="m", n_layers=2, seeds=[1, 2], sensitivity=None)
    assert [(p.layer, p.seed) for p in specs] == [(0, UNUSED_SEED), (1, UNUSED_SEED)]
    # a stored <component>__fixed row (seed NULL) is a valid top-ΔNLL pick
    stored = pd.DataFrame({"kind": ["scale"], "component": ["norm.input"], "layer": [0], "expert": [None],
                           "strength": [1.1], "seed": pd.array([pd.NA], dtype="Int64"), "mode": ["noise"],
                           "selection": ["random"], "group_size": [None], "delta_nll": [0.5]})  # fmt: skip
    picked, labels = select_points(ZeroShotAt(top_delta_nll=1), model="m", n_layers=2, seeds=[1, 2], sensitivity=stored)
    assert [(p.kind, p.layer, p.seed) for p in picked] == [("scale", 0, UNUSED_SEED)]


def test_a_grid_on_a_global_component_is_one_point_with_layer_none_that_can_be_applied(tiny) -> None:
    # embedding / norm.final / lm_head are not inside a decoder layer: a grid used to give them one point per
    # layer, each of which failed when scored ("pass layer=None") after the whole sweep had run
    from esa_pipeline.core import adapter_for, perturbed
    from esa_pipeline.core.config import ZeroShotAt, ZeroShotGrid
    from esa_pipeline.core.evaluation.zeroshot_points import select_points

    at = ZeroShotAt(grid=ZeroShotGrid(components=["embedding", "ffn.down"], layers=[0, 1], strengths=[0.1], seeds=[7]))
    specs, labels = select_points(at, model="m", n_layers=2, seeds=[1], sensitivity=None)
    assert [(p.component, p.layer, p.seed) for p in specs] == [("embedding", None, 7), ("ffn.down", 0, 7),
                                                               ("ffn.down", 1, 7)]  # fmt: skip
    assert labels == ["grid"] * 3
    lm = tiny("tiny-llama")
    for p in specs:
        with perturbed(lm.model, adapter_for(lm.model), p) as report:
            assert report.changed_fraction > 0.9
