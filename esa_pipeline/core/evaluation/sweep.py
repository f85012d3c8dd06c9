"""A sensitivity sweep: perturbation specs evaluated against one baseline, in layer order, sharing one prefix cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from esa_pipeline.core.evaluation.paired import evaluate_against
from esa_pipeline.core.evaluation.perplexity import PerplexityResult, unwrap
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import adapter_or_default
from esa_pipeline.core.perturbation.perturb import Perturbation

# `sensitivity` columns produced here, in order (the caller adds `variant` and provenance).
SENSITIVITY_COLUMNS = [
    "model", "dataset", "window_tokens", "kind", "component", "layer", "expert", "strength", "seed", "mode",
    "selection", "group_size", "delta_nll", "ppl_ratio", "ppl_ratio_se", "kl", "kl_lower_bound_topk",
    "top1_agreement", "token_ppl", "nll_sum",
    "n_tokens", "nonfinite", "relative_change", "changed_fraction", "n_changed", "restored",
    "used_prefix_cache", "tokens_per_s", "elapsed_s", "random_weights", "also_perturbed",
    "batches_used", "stop_reason", "cs_lower", "cs_upper", "cs_windows",
]  # fmt: skip
SENSITIVITY_WINDOW_COLUMNS = [
    "model", "dataset", "kind", "component", "layer", "expert", "strength", "seed", "mode", "selection",
    "group_size", "window_id", "doc_id", "nll_sum", "n_tokens", "delta_nll_sum",
]  # fmt: skip


def layer_order(specs: list[Perturbation]) -> list[Perturbation]:
    """Stable sort by layer; layer-less specs (embedding) first, since they precede layer 0."""
    return sorted(specs, key=lambda p: -1 if p.layer is None else p.layer)


def run_sweep(
    lm: Any,
    base: PerplexityResult,
    specs: list[Perturbation],
    *,
    adapter: Any = None,
    cache: PrefixCache | None = None,
    log: Callable[[str], None] | None = None,
    rule: Any = None,
    scores: Callable[[Perturbation], list | None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sensitivity rows, sensitivity_windows rows) for `specs`, ordered by layer. Builds the prefix cache
    once unless one is given; `log` receives one progress line per layer. With a `rule`
    (`sequential.SequentialRule`) every point visits the windows in the seeded random order of
    `adaptive.visit_ordered(base)` and stops scoring once its decision is made (adaptive budget); a given `cache`
    must then be built from that visit-ordered baseline (ValueError otherwise).
    `scores(p)` gives a spec its `scores=` (e.g. Wanda's |W|·‖X‖ for prune mode "wanda"), None for most.
    Raises TypeError, before any work, unless `specs` is a list (or tuple) of Perturbation."""
    if not isinstance(specs, list | tuple) or not all(isinstance(p, Perturbation) for p in specs):
        raise TypeError(f"specs must be a list of Perturbation, got {type(specs).__name__}"
                        + ("" if not isinstance(specs, list | tuple) else
                           f" of {sorted({type(p).__name__ for p in specs})}")
                        + "; wrap one spec as [p], build dicts with Perturbation(**d)")  # fmt: skip
    model, _, spec = unwrap(lm)
    adapter = adapter_or_default(model, adapter)
    if rule is not None:
        from esa_pipeline.core.evaluation.adaptive import visit_base

        base = visit_base(base, cache)
        if cache is not None and cache.base is not base:
            raise ValueError("adaptive sweeps need the prefix cache of the visit-ordered baseline: build it with "
                             "PrefixCache.build(lm, adaptive.visit_ordered(base), adapter)")
    if cache is None:
        cache = PrefixCache.build(lm, base, adapter)
        if log is not None:
            state = f"{cache.captured_bytes / 2**20:.1f} MiB" if cache.enabled else f"disabled: {cache.reason}"
            log(f"prefix cache built in {cache.build_s:.2f}s ({state})")
    context = {
        "model": getattr(spec, "name", base.model), "dataset": base.dataset, "window_tokens": base.window,
        "random_weights": getattr(spec, "random_weights", base.random_weights),
    }  # fmt: skip
    rows, window_frames = [], []
    ordered = layer_order(specs)
    layer_started, layer_points = time.perf_counter(), 0
    for index, p in enumerate(ordered):
        result = evaluate_against(lm, base, p, adapter=adapter, cache=cache, rule=rule,
                                  scores=None if scores is None else scores(p))
        # Tied embeddings: the embedding and the head are one tensor, so the row names the other one too.
        rows.append({**context, **result.to_row(), "also_perturbed": adapter.also_perturbed(p.component)
                     if p.kind not in ("layer_drop",) else None})
        frame = result.windows.assign(
            model=context["model"], dataset=base.dataset, kind=p.kind, component=p.component, layer=p.layer,
            expert=p.expert, strength=p.strength, seed=p.seed, mode=p.mode, selection=p.selection,
            group_size=p.group_size,
        )  # fmt: skip
        window_frames.append(frame)
        layer_points += 1
        last_of_layer = index + 1 == len(ordered) or ordered[index + 1].layer != p.layer
        if log is not None and last_of_layer:
            where = "embedding/global" if p.layer is None else f"layer {p.layer}"
            log(f"{where}: {layer_points} points in {time.perf_counter() - layer_started:.2f}s "
                f"({index + 1}/{len(ordered)} done)")  # fmt: skip
            layer_started, layer_points = time.perf_counter(), 0
    sensitivity = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    windows = (
        pd.concat(window_frames, ignore_index=True)[SENSITIVITY_WINDOW_COLUMNS]
        if window_frames
        else pd.DataFrame(columns=SENSITIVITY_WINDOW_COLUMNS)
    )
    for frame in (sensitivity, windows):
        for column in ("layer", "expert", "group_size"):
            frame[column] = frame[column].astype("Int64")
    return sensitivity, windows
