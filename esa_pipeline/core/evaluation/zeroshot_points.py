"""Zero-shot multiple-choice accuracy at perturbation points, item by item, paired with the baseline.

`McSuite.build(lm, ["esa_mc"])` turns lm-eval tasks into their (context, continuation) requests (lm-eval's own
`Task.build_all_requests`, so prompts, few-shot examples and choices are lm-eval's), scores the unperturbed
model once and builds the prefix cache. `zero_shot_points(suite, specs)` then applies each perturbation
(`perturbed`: exact restore, verified per point), re-scores every request with `mc_scoring` (nothing is reused
across weights except the decoder-layer inputs below the perturbed layer, which that layer cannot change) and
returns one row per (point, item) of the `zero_shot_sensitivity` relation. Correctness is lm-eval's
`Task.process_results` (`acc`: argmax of the summed log-likelihoods; `acc_norm`: divided by the choice's
length in characters) applied to this scorer's log-likelihoods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from esa_pipeline.core.evaluation.mc_scoring import (
    EncodedRequest,
    LmEvalTokenization,
    RequestBaseline,
    RequestBatches,
    RequestScores,
    score_requests,
)
from esa_pipeline.core.evaluation.perplexity import model_device, unwrap
from esa_pipeline.core.evaluation.scoring import adapter_or_default
from esa_pipeline.core.perturbation.perturb import (
    UNUSED_SEED,
    Perturbation,
    perturbed,
    seed_independent,
    seed_independent_rows,
)

# The scorer that produced the rows: this module's evaluator, checked equal to lm-eval's per-item
# log-likelihoods by esa_pipeline_tests/core/test_mc_scoring.py.
SCORER = "esa-mc (lm-eval 0.4.13 requests and tokenization, own forward + prefix cache)"
SPEC_COLUMNS = ["kind", "component", "layer", "expert", "strength", "seed", "mode", "selection", "group_size"]
ITEM_COLUMNS = [
    "model", "task", *SPEC_COLUMNS, "item_id", "doc_id", "n_choices", "gold",
    "pred_before", "pred_after", "correct_before", "correct_after", "correct_norm_before", "correct_norm_after",
    "margin_before", "margin_after", "join_merged", "restored", "relative_change", "changed_fraction",
    "selected_by", "used_prefix_cache", "elapsed_s", "scorer", "random_weights",
]  # fmt: skip
GRID, TOP, CONTROL = "grid", "top_delta_nll", "random_control"


class NotMultipleChoice(ValueError):
    """A task whose output type is not multiple_choice (generation tasks have no per-choice likelihoods)."""


@dataclass
class McItem:
    task: str
    doc_id: int
    item_id: str
    doc: dict
    choices: list[str]
    gold: list[int]  # gold choice indices (usually one)
    first: int  # index of its first request in the suite; its choices follow in order

    @property
    def n_choices(self) -> int:
        return len(self.choices)


def _gold(task: Any, doc: dict, choices: list[str], where: str) -> list[int]:
    target = task.doc_to_target(doc)
    targets = target if isinstance(target, list) else [target]
    gold = [choices.index(t) if isinstance(t, str) and t in choices else t for t in targets]
    if not all(isinstance(g, (int, np.integer)) and 0 <= g < len(choices) for g in gold):
        raise ValueError(f"{where}: gold answer {target!r} is not one of its {len(choices)} choices")
    return [int(g) for g in gold]


def task_items(tasks: dict[str, Any], limit: int | None) -> tuple[list[McItem], list[tuple[str, str, str]]]:
    """(items, requests as (key, context, continuation)) of lm-eval Task objects, in task then doc order."""
    items: list[McItem] = []
    requests: list[tuple[str, str, str]] = []
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "multiple_choice":
            raise NotMultipleChoice(f"zero-shot task {name!r} has output_type {task.OUTPUT_TYPE!r}; accuracy under "
                                    "perturbation needs multiple_choice tasks")  # fmt: skip
        task.build_all_requests(limit=limit, rank=0, world_size=1, cache_requests=False)
        by_doc: dict[int, list[Any]] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        for doc_id in sorted(by_doc):
            instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
            doc = instances[0].doc
            item_id = str(doc.get("id", doc_id)) if isinstance(doc, dict) else str(doc_id)
            choices = [str(c) for c in task.doc_to_choice(doc)]
            if len(instances) != len(choices):
                raise ValueError(f"{name}/{item_id}: {len(instances)} requests for {len(choices)} choices")
            where = f"{name}/{item_id}"
            items.append(McItem(name, doc_id, item_id, doc, choices, _gold(task, doc, choices, where), len(requests)))
            for instance in instances:
                context, continuation = instance.arguments
                requests.append((f"{where}/choice{instance.idx}", context, continuation))
    return items, requests


NO_ANSWER = -1  # `ItemOutcomes.pred` of an item whose log-likelihoods rank nothing (NULL in the stored rows)


@dataclass
class ItemOutcomes:
    pred: np.ndarray  # [I] int: argmax of log-likelihoods; NO_ANSWER when a choice's is NaN or all are -inf
    correct: np.ndarray  # [I] bool: lm-eval's acc
    correct_norm: np.ndarray  # [I] bool: lm-eval's acc_norm
    margin: np.ndarray  # [I] float: best gold log-likelihood minus best other choice's (nats)


class McSuite:
    """Items and requests of some multiple-choice tasks, with the unperturbed model's scores and prefix cache."""

    def __init__(self, lm: Any, tasks: dict[str, Any], items: list[McItem], requests: list[EncodedRequest],
                 baseline: RequestBaseline, cache: Any, adapter: Any) -> None:  # fmt: skip
        self.lm, self.tasks, self.items, self.requests = lm, tasks, items, requests
        self.baseline, self.cache, self.adapter = baseline, cache, adapter
        self.outcomes = self.item_outcomes(baseline.result)

    @classmethod
    def build(cls, lm: Any, task_names: list[str], *, limit: int | None = None, num_fewshot: int = 0,
              batch_size: int = 8, adapter: Any = None, use_prefix_cache: bool = True) -> McSuite:  # fmt: skip
        """Loads the tasks (clear errors for unknown/unavailable ones before model work), scores the baseline."""
        from esa_pipeline.core.evaluation.zeroshot import FEWSHOT_SEED, load_tasks

        model, tokenizer, _ = unwrap(lm)
        tasks = load_tasks(list(task_names))
        for task in tasks.values():  # the rule zero_shot()/simple_evaluate apply
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        items, raw = task_items(tasks, limit)
        tokenization = LmEvalTokenization(tokenizer, model)
        requests = [tokenization.encode_request(*r) for r in raw]
        batches = RequestBatches.build(requests, tokenization.max_length, batch_size, tokenization.prefix_token_id)
        adapter = adapter_or_default(model, adapter)
        result = score_requests(model, batches, adapter=adapter)
        baseline = RequestBaseline(batches, result.tokens, result)
        cache = None
        if use_prefix_cache:
            from esa_pipeline.core.evaluation.prefix_cache import PrefixCache

            cache = PrefixCache.build(lm, baseline, adapter)  # re-checks the baseline's per-token NLL
        return cls(lm, tasks, items, requests, baseline, cache, adapter)

    @property
    def n_join_merged(self) -> int:
        return sum(r.join_merged for r in self.requests)

    def item_outcomes(self, scores: RequestScores) -> ItemOutcomes:
        n = len(self.items)
        pred, margin = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64)
        correct, correct_norm = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for i, item in enumerate(self.items):
            ll = scores.loglikelihood[item.first : item.first + item.n_choices]  # [C]
            greedy = scores.is_greedy[item.first : item.first + item.n_choices]  # [C]
            if np.isnan(ll).any() or not np.isfinite(ll).any():
                # an overflowed model ranks nothing: np.argmax (and lm-eval's acc) would return the first NaN's
                # index, i.e. "answer 0", right whenever gold is 0. No answer is a wrong answer, as measured.
                pred[i], margin[i] = NO_ANSWER, np.nan
                continue
            metrics = self.tasks[item.task].process_results(item.doc, list(zip(ll.tolist(), greedy.tolist(), strict=True)))
            pred[i] = int(np.argmax(ll))
            correct[i] = bool(metrics["acc"])
            correct_norm[i] = bool(metrics.get("acc_norm", np.nan) == 1.0)
            others = np.delete(ll, item.gold)
            margin[i] = float(ll[item.gold].max() - others.max()) if others.size else np.nan
        return ItemOutcomes(pred, correct, correct_norm, margin)


def _answers(pred: np.ndarray) -> pd.arrays.IntegerArray:
    """Predicted choice per item, NULL for NO_ANSWER."""
    return pd.array(np.where(pred == NO_ANSWER, None, pred).tolist(), dtype="Int64")


def zero_shot_points(suite: McSuite, specs: list[Perturbation], *, selected_by: list[str] | None = None,
                     log: Callable[[str], None] | None = None) -> pd.DataFrame:  # fmt: skip
    """One `zero_shot_sensitivity` row per (spec, item), specs in the given order, columns ITEM_COLUMNS.

    selected_by: per spec, why it was measured (GRID / TOP / CONTROL; default GRID).
    """
    if selected_by is not None and len(selected_by) != len(specs):
        raise ValueError(f"selected_by has {len(selected_by)} labels for {len(specs)} specs")
    labels = selected_by or [GRID] * len(specs)
    model, _, spec_info = unwrap(suite.lm)
    cache = suite.cache if suite.cache is not None and suite.cache.enabled else None
    base = suite.outcomes
    merged = np.array([any(r.join_merged for r in suite.requests[i.first : i.first + i.n_choices])
                       for i in suite.items])  # fmt: skip
    frames = []
    for p, label in zip(specs, labels, strict=True):
        start_layer = cache.start_layer(p) if cache is not None else None
        forward = None if start_layer is None else (lambda index, _batch, L=start_layer: cache.hidden_from(L, index))
        started = time.perf_counter()
        with perturbed(model, suite.adapter, p) as report:
            scores = score_requests(model, suite.baseline.requests, forward, adapter=suite.adapter)
        if model_device(model).type == "cuda":
            import torch

            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        after = suite.item_outcomes(scores)
        frame = pd.DataFrame({
            "model": getattr(spec_info, "name", None), "task": [i.task for i in suite.items],
            **{c: getattr(p, c) for c in SPEC_COLUMNS},
            "item_id": [i.item_id for i in suite.items], "doc_id": [i.doc_id for i in suite.items],
            "n_choices": [i.n_choices for i in suite.items], "gold": [i.gold[0] for i in suite.items],
            "pred_before": _answers(base.pred), "pred_after": _answers(after.pred),
            "correct_before": base.correct, "correct_after": after.correct,
            "correct_norm_before": base.correct_norm, "correct_norm_after": after.correct_norm,
            "margin_before": base.margin, "margin_after": after.margin, "join_merged": merged,
            "restored": report.restored, "relative_change": report.relative_change,
            "changed_fraction": report.changed_fraction, "selected_by": label,
            "used_prefix_cache": start_layer is not None,
            "elapsed_s": elapsed, "scorer": SCORER, "random_weights": getattr(spec_info, "random_weights", None),
        })  # fmt: skip
        frames.append(frame)
        if log is not None:
            log(f"{p.kind} {p.component} L{p.layer} s={p.strength} seed={p.seed}: accuracy "
                f"{base.correct.mean():.3f} -> {after.correct.mean():.3f} in {elapsed:.1f}s")  # fmt: skip
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ITEM_COLUMNS)
    for column in ("layer", "expert", "group_size", "seed"):
        out[column] = out[column].astype("Int64")
    # the seed drew nothing for a seed-independent point: NULL, as in the sweep's <component>__fixed rows
    out.loc[seed_independent_rows(out), "seed"] = pd.NA
    return out[ITEM_COLUMNS]


def _spec_from_row(row: Any) -> Perturbation:
    def optional_int(value: Any) -> int | None:
        return None if pd.isna(value) else int(value)

    return Perturbation(kind=str(row.kind), component=str(row.component), layer=optional_int(row.layer),
                        strength=float(row.strength), seed=UNUSED_SEED if pd.isna(row.seed) else int(row.seed), expert=optional_int(row.expert),
                        mode=str(row.mode), selection=str(row.selection),
                        group_size=optional_int(getattr(row, "group_size", None)))  # fmt: skip


def select_points(at: Any, *, model: str, n_layers: int, seeds: list[int], sensitivity: pd.DataFrame | None,
                  neuron_mode: str = "noise") -> tuple[list[Perturbation], list[str]]:  # fmt: skip
    """The perturbation points of a `zero_shot.at` setting (core.config.ZeroShotAt) for one model.

    grid: every component x layer x strength x seed of `at.grid`; top_delta_nll: the N stored sweep points
    with the largest ΔNLL (NaN/inf first: an overflowed point is the most damaging); random_controls: N other
    stored sweep points drawn without replacement by a generator seeded from (model, control_seed), so the
    same settings always pick the same controls. Returns (specs, selected_by), each point once.
    """
    from esa_pipeline.core.config import select_layers
    from esa_pipeline.core.models.adapters.base import GLOBAL_COMPONENTS
    from esa_pipeline.core.provenance import stable_hash

    specs: list[Perturbation] = []
    labels: list[str] = []

    def add(p: Perturbation, label: str) -> None:
        if p not in specs:
            specs.append(p)
            labels.append(label)

    if at.grid is not None:
        grid = at.grid
        for component in grid.components:
            # a global component (embedding, norm.final, lm_head) is one point with layer None, as in the sweep
            layers = [None] if component in GLOBAL_COMPONENTS else select_layers(grid.layers, n_layers)
            for layer in layers:
                for strength in grid.strengths:
                    mode = neuron_mode if grid.kind == "neurons" else "noise"
                    # a seed-independent kind (norm scale) is one point, not one per seed (stored seed NULL)
                    for seed in [UNUSED_SEED] if seed_independent(grid.kind, "random", mode) else grid.seeds or seeds:
                        add(Perturbation(kind=grid.kind, component=component, layer=layer, strength=strength,
                                         seed=seed, mode=mode), GRID)  # fmt: skip
    wanted = at.top_delta_nll + at.random_controls
    if wanted:
        if sensitivity is None or sensitivity.empty:
            raise ValueError(f"zero_shot.at asks for {wanted} sweep points of {model}, but it has no sensitivity "
                             "rows under its current settings: materialize its sensitivity partitions first")
        key = sensitivity["delta_nll"].astype(float).where(lambda v: np.isfinite(v), np.inf)
        ordered = sensitivity.assign(_key=key).sort_values("_key", ascending=False, kind="stable")
        rows = list(ordered.itertuples(index=False))
        for row in rows[: at.top_delta_nll]:
            add(_spec_from_row(row), TOP)
        rest = [r for r in rows[at.top_delta_nll :] if _spec_from_row(r) not in specs]
        seed = int(stable_hash({"model": model, "control_seed": at.control_seed}), 16) % 2**63
        rng = np.random.default_rng(seed)
        for index in sorted(rng.choice(len(rest), size=min(at.random_controls, len(rest)), replace=False)):
            add(_spec_from_row(rest[index]), CONTROL)
    return specs, labels
