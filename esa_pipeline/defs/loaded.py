"""Per-process caches of loaded models and their baseline evaluations.

Steps of the in-process executor (and repeated partitions of one model in a process) reuse one load; the
cache holds one model so that two 8B models never sit in memory together. Weights in the cache must stay
pristine: a sweep that reports an unrestored point evicts it (`forget_models`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from esa_pipeline.core.config import ModelPlan

if TYPE_CHECKING:
    from esa_pipeline.core.evaluation.perplexity import PerplexityResult
    from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
    from esa_pipeline.core.models.registry import LoadedModel


# Models loaded by this process (a measurement: a backfill run should load each model once).
LOAD_COUNT = {"loads": 0}


@functools.lru_cache(maxsize=1)
def _load(source: str, revision: str | None, dtype: str, device: str, trust_remote_code: bool,
          adapter: str | None = None) -> LoadedModel:
    from esa_pipeline.core.models.registry import load_model

    LOAD_COUNT["loads"] += 1
    return load_model(source, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                      adapter=adapter)


def loaded_model(plan: ModelPlan) -> LoadedModel:
    return _load(plan.source, plan.revision, plan.dtype, plan.device, plan.trust_remote_code, plan.adapter)


@functools.lru_cache(maxsize=2)
def _baseline(
    source: str, revision: str | None, dtype: str, device: str, trust_remote_code: bool,
    dataset: str, window: int, token_budget: int, batch_size: int, adapter: str | None = None,
) -> PerplexityResult:  # fmt: skip
    from esa_pipeline.core.evaluation.perplexity import perplexity
    from esa_pipeline.core.evaluation.text import load_texts

    lm = _load(source, revision, dtype, device, trust_remote_code, adapter)
    texts = load_texts(dataset)
    return perplexity(lm, texts, window, max_tokens=token_budget, batch_size=batch_size, dataset=dataset)


def baseline_result(plan: ModelPlan, dataset: str, token_budget: int | None = None) -> PerplexityResult:
    """Baseline perplexity of the plan's model on `dataset` (deterministic, so recomputing equals the stored one).

    `token_budget` defaults to the plan's; importance scoring asks for its own (smaller) budget.
    """
    return _baseline(
        plan.source, plan.revision, plan.dtype, plan.device, plan.trust_remote_code,
        dataset, plan.window, token_budget or plan.token_budget, plan.batch_size, plan.adapter,
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _prefix_cache(
    source: str, revision: str | None, dtype: str, device: str, trust_remote_code: bool,
    dataset: str, window: int, token_budget: int, batch_size: int, adapter: str | None = None,
    visit_order: bool = False,
) -> PrefixCache:  # fmt: skip
    from esa_pipeline.core.evaluation.adaptive import visit_ordered
    from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
    from esa_pipeline.core.models.adapters import adapter_for

    lm = _load(source, revision, dtype, device, trust_remote_code, adapter)
    base = _baseline(source, revision, dtype, device, trust_remote_code, dataset, window, token_budget, batch_size,
                     adapter)  # fmt: skip
    return PrefixCache.build(lm, visit_ordered(base) if visit_order else base, adapter_for(lm.model, adapter))


def prefix_cache(plan: ModelPlan, dataset: str) -> PrefixCache:
    """The prefix cache of `baseline_result(plan, dataset)` for the plan's sweep points: every sweep partition of
    a run shares one build. With adaptive budgets it is built from the baseline's visit order
    (`adaptive.visit_ordered`), whose batches adaptive points score."""
    return _prefix_cache(
        plan.source, plan.revision, plan.dtype, plan.device, plan.trust_remote_code,
        dataset, plan.window, plan.token_budget, plan.batch_size, plan.adapter, plan.adaptive.enabled,
    )  # fmt: skip


def forget_models() -> None:
    """Drop cached models, baselines and prefix caches (after a failed restore, the in-memory weights are suspect)."""
    _prefix_cache.cache_clear()
    _baseline.cache_clear()
    _load.cache_clear()
