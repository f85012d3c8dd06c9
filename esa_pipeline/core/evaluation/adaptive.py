"""Adaptive token budgets: score a point's windows batch by batch and stop once its anytime-valid confidence
sequence has decided it (`sequential.py` has the sequence and the rule, with their sources).

Batches are visited in one seeded order shared by every point of a baseline (so early-stopped points are paired
on the same first windows), and the fixed budget is the cap. The prefix cache serves every batch as in a fixed
sweep. The stored per-window rows are exactly the windows that were scored, so downstream paired tests use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections import Counter
from typing import Any

import torch

from esa_pipeline.core.evaluation.paired import PairedResult, iter_paired_batches, paired_metrics, point_setup
from esa_pipeline.core.evaluation.perplexity import PerplexityResult, per_window_sums
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import (
    TokenScores,
    concat_scores,
    model_device,
)
from esa_pipeline.core.evaluation.sequential import (
    STOP_BUDGET,
    DocumentAccumulator,
    SequenceState,
    SequentialRule,
    sequence_state,
    stop_reason,
)
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed

ORDER_SEED = 0


def batch_order(n_batches: int, seed: int = ORDER_SEED) -> list[int]:
    """A seeded permutation of batch indices (sha256 ranks: the same on every platform and library version).
    Batches hold consecutive windows of the document-stratified sample, so a random batch order spreads the first
    scored windows across documents."""
    return sorted(range(n_batches), key=lambda i: hashlib.sha256(repr((seed, i)).encode()).digest())


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
    stopped the point (all of them at most). The result records batches_used, stop_reason (one of
    `sequential.STOP_REASONS`) and the sequence's bounds cs_lower/cs_upper over cs_documents documents.

    Raises ValueError when `cache` belongs to another baseline or the baseline kept no final hidden states.
    """
    model, adapter, batches, start_layer, originals = point_setup(lm, base, p, adapter=adapter, cache=cache)
    windows = {w.window_id: w for w in base.token_windows}
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + batch.n_scored)
    accumulator = DocumentAccumulator(dict(Counter(w.doc_id for w in base.token_windows)))

    started = time.perf_counter()
    parts: list[TokenScores] = []
    used: list[int] = []
    reason: str | None = None
    state = SequenceState(0, math.nan, -math.inf, math.inf)
    with perturbed(model, adapter, p, scores) as report:
        stream = iter_paired_batches(model, adapter, base, batches, cache=cache, start_layer=start_layer,
                                     originals=originals, order=batch_order(len(batches)))  # fmt: skip
        with contextlib.closing(stream):
            for index, batch_scores in stream:
                parts.append(batch_scores)
                used.append(index)
                batch_windows = [windows[i] for i in batches[index].window_ids]
                base_nll = base.scores.nll[offsets[index] : offsets[index + 1]]  # [n]
                diff = batch_scores.nll.double() - base_nll.double()  # [n]
                for w, d in zip(batch_windows, per_window_sums(diff, batch_windows), strict=True):
                    accumulator.add(w.doc_id, d, w.n_scored)
                state = sequence_state(accumulator.units, rule)
                reason = stop_reason(state, rule)
                if reason is not None:
                    break
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started

    scored = scored_baseline(base, [windows[i] for index in used for i in batches[index].window_ids],
                             [(offsets[index], offsets[index + 1]) for index in used])  # fmt: skip
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
        batches_used=len(used),
        stop_reason=reason or STOP_BUDGET,
        cs_lower=state.lower,
        cs_upper=state.upper,
        cs_documents=state.n_units,
        **result,
    )


def scored_baseline(base: PerplexityResult, windows: list, spans: list[tuple[int, int]]) -> PerplexityResult:
    """`base` restricted to `windows` (in scoring order), whose baseline tokens lie at `spans` of its scores."""
    nll = torch.cat([base.scores.nll[a:b] for a, b in spans])  # [n]
    argmax = torch.cat([base.scores.argmax[a:b] for a, b in spans])  # [n]
    return dataclasses.replace(
        base, token_windows=windows, scores=TokenScores(nll, argmax), final_hidden=None, n_windows=len(windows),
        n_tokens=int(nll.numel()),
    )  # fmt: skip
