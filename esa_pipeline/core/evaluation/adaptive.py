"""Adaptive token budgets: score a point's windows batch by batch and stop once its anytime-valid confidence
sequence has decided it (`sequential.py` has the sequence, the rule, the estimand and their sources).

The fixed budget's windows are visited in one seeded, uniformly random order shared by every point of a
baseline (`visit_ordered`), and batches hold consecutive windows of that order: each batch is a random subset
of the budget, early-stopped points are paired on the same first windows, and the scored windows are a sample
without replacement from the budget whatever the dependence between windows of one document. The prefix cache
serves every batch when it is built from the visit-ordered baseline (`run_sweep` does so). The fixed budget is
the cap. The stored per-window rows are exactly the windows that were scored, so downstream paired tests and the
document-clustered significance analysis use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from typing import Any

import numpy as np
import torch

from esa_pipeline.core.evaluation.paired import PairedResult, iter_paired_batches, paired_metrics, point_setup
from esa_pipeline.core.evaluation.perplexity import PerplexityResult, per_window_sums
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import TokenScores, concat_scores, model_device
from esa_pipeline.core.evaluation.sequential import (
    STOP_BUDGET,
    SequenceState,
    SequentialRule,
    sequence_state,
    stop_reason,
    window_observations,
)
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed

ORDER_SEED = 0


def window_order(n_windows: int, seed: int = ORDER_SEED) -> list[int]:
    """A seeded uniformly random permutation of window positions 0..n_windows-1 (sha256 ranks: the same on every
    platform and library version, and a function of the seed alone)."""
    return sorted(range(n_windows), key=lambda i: hashlib.sha256(repr((seed, i)).encode()).digest())


def visit_ordered(base: PerplexityResult, seed: int = ORDER_SEED) -> PerplexityResult:
    """`base` with its windows in the seeded random visit order of adaptive points (`window_order`): token
    windows, per-token scores [N], final hidden states [N, H] and the `windows` frame are permuted together, so
    `visit.batches()` are batches of consecutive windows of that order and every paired function works on it
    unchanged. `visit_seed` records the seed. Returns `base` itself when it is already in that order.

    Raises ValueError when `base` is already in the visit order of another seed.
    """
    if base.visit_seed is not None:
        if base.visit_seed != seed:
            raise ValueError(f"the baseline is already in the visit order of seed {base.visit_seed}, not {seed}")
        return base
    order = window_order(base.n_windows, seed)
    offsets = np.cumsum([0] + [w.n_scored for w in base.token_windows])
    index = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in order])  # [N]

    def take(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[index.to(values.device)]

    s = base.scores
    return dataclasses.replace(
        base, token_windows=[base.token_windows[i] for i in order],
        scores=TokenScores(s.nll[index], s.argmax[index], take(s.kl), take(s.kl_lower_bound)),
        final_hidden=take(base.final_hidden), windows=base.windows.iloc[order].reset_index(drop=True),
        visit_seed=seed,
    )  # fmt: skip


def visit_base(base: PerplexityResult, cache: PrefixCache | None = None) -> PerplexityResult:
    """The visit-ordered baseline the adaptive points of `base` use: `cache.base` when that cache was built from
    `base`'s visit order (the same windows, tokens and order), else `visit_ordered(base)`."""
    visit = base if base.visit_seed is not None else None
    if visit is None and cache is not None and cache.base.visit_seed is not None:
        order = window_order(base.n_windows, cache.base.visit_seed)
        if cache.base.token_windows == [base.token_windows[i] for i in order]:
            visit = cache.base
    return visit if visit is not None else visit_ordered(base)


def evaluate_adaptive(
    lm: Any,
    base: PerplexityResult,
    p: Perturbation,
    rule: SequentialRule,
    *,
    adapter: Any = None,
    cache: PrefixCache | None = None,
    scores: list[torch.Tensor] | None = None,
) -> PairedResult:
    """`evaluate_against` with an adaptive budget: the same metrics, over the windows scored before `rule`
    stopped the point (all of them at most). `base` may be in document order (it is put in visit order here) or
    already `visit_ordered`; a `cache` must be built from the visit-ordered baseline. The result records
    batches_used, stop_reason (one of `sequential.STOP_REASONS`) and the sequence's bounds cs_lower/cs_upper
    (nats per token) over cs_windows windows.

    Raises ValueError when `cache` belongs to another baseline (e.g. the document-ordered one) or the baseline
    kept no final hidden states.
    """
    visit = visit_base(base, cache)
    if cache is not None and cache.base is not visit:
        raise ValueError("adaptive points need the prefix cache of the visit-ordered baseline: build it with "
                         "PrefixCache.build(lm, adaptive.visit_ordered(base), adapter) and pass that baseline")
    model, adapter, batches, start_layer, originals = point_setup(lm, visit, p, adapter=adapter, cache=cache)
    windows = visit.token_windows
    mean_tokens = visit.n_tokens / visit.n_windows  # tokens per window over the whole budget
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + batch.n_scored)

    started = time.perf_counter()
    parts: list[TokenScores] = []
    units: list[float] = []
    reason: str | None = None
    state = SequenceState(0, math.nan, -math.inf, math.inf)
    with perturbed(model, adapter, p, scores) as report:
        stream = iter_paired_batches(model, adapter, visit, batches, cache=cache, start_layer=start_layer,
                                     originals=originals)  # fmt: skip
        with contextlib.closing(stream):
            for index, batch_scores in stream:
                parts.append(batch_scores)
                batch_windows = windows[len(units) : len(units) + len(batches[index].window_ids)]
                base_nll = visit.scores.nll[offsets[index] : offsets[index + 1]]  # [n]
                diff = batch_scores.nll.double() - base_nll.double()  # [n]
                units.extend(window_observations(per_window_sums(diff, batch_windows), mean_tokens))
                state = sequence_state(units, rule)
                reason = stop_reason(state, rule)
                if reason is not None:
                    break
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started

    scored = scored_prefix(visit, len(units), offsets[len(parts)])
    result = paired_metrics(scored, concat_scores(parts))
    return PairedResult(
        spec=p,
        n_tokens=scored.n_tokens,
        restored=report.restored,
        relative_change=report.relative_change,
        changed_fraction=report.changed_fraction,
        n_changed=report.n_changed,
        used_prefix_cache=start_layer is not None,
        tokens_per_s=scored.n_tokens / elapsed,
        elapsed_s=elapsed,
        notes=list(report.notes),
        batches_used=len(parts),
        stop_reason=reason or STOP_BUDGET,
        cs_lower=state.lower,
        cs_upper=state.upper,
        cs_windows=state.n_units,
        **result,
    )


def scored_prefix(visit: PerplexityResult, n_windows: int, n_tokens: int) -> PerplexityResult:
    """`visit` restricted to its first `n_windows` windows, whose baseline tokens are the first `n_tokens`."""
    return dataclasses.replace(
        visit, token_windows=visit.token_windows[:n_windows],
        scores=TokenScores(visit.scores.nll[:n_tokens], visit.scores.argmax[:n_tokens]), final_hidden=None,
        windows=visit.windows.iloc[:n_windows], n_windows=n_windows, n_tokens=n_tokens,
    )  # fmt: skip
