"""Causal validation of importance rankings, and how stable the rankings are.

A metric is worth something if perturbing its top-k weights hurts far more than perturbing a random k, and
its bottom-k hurts least (the origin system's protocol). For each (metric, kind, component, layer, fraction)
this runs `evaluate_against` with `selection` top / bottom (ranked by |score|, per slice) and random (seeded).

- top/bottom selections do not draw random numbers: they are evaluated once, with seed = seeds[0].
- random-k does not depend on the metric: it is evaluated once per seed and its row is repeated under every
  metric, so "top vs random for metric X" is a single filter in SQL.
- `gaussian` on a selected subset is not a kind `perturb.py` offers (its gaussian noise covers the whole
  slice and ignores `selection`), so it is refused here rather than silently perturbing every weight.

Ranking stability: Jaccard overlap of per-(component, layer) top-k sets between metrics of one result, and
between two results of the same metric (two halves of the data, two Hutchinson seeds).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pandas as pd
import torch

from esa_pipeline.core.analysis.consistency import jaccard
from esa_pipeline.core.importance.metrics import ImportanceResult, param_flat_indices

VALIDATION_COLUMNS = ["model", "metric", "kind", "selection", "component", "layer", "strength", "seed", "k",
                      "delta_nll", "ppl_ratio", "relative_change", "changed_fraction", "restored"]
OVERLAP_COLUMNS = ["component", "layer", "metric_a", "metric_b", "source_a", "source_b", "k", "jaccard"]
VALIDATION_KINDS = ("zero", "sign_flip", "bit_flip")


def selected_count(fraction: float, numel: int) -> int:
    """Elements a weight-level perturbation of `fraction` touches in one slice (perturb.py's rounding rule)."""
    return min(numel, max(1, round(fraction * numel)))


def validate_importance(lm, base, result: ImportanceResult, *, metrics: Sequence[str] | None = None,
                        kinds: Sequence[str] = VALIDATION_KINDS,
                        selections: Sequence[str] = ("top", "random", "bottom"),
                        fractions: Sequence[float] = (0.001,), seeds: Sequence[int] = (0,),
                        groups: Sequence[tuple[str, int | None]] | None = None,
                        adapter=None, cache=None) -> pd.DataFrame:
    """`importance_validation` rows; strength = fraction of slice elements, k = elements perturbed."""
    from esa_pipeline.core.evaluation.paired import evaluate_against
    from esa_pipeline.core.perturbation.perturb import Perturbation

    bad = [k for k in kinds if k not in VALIDATION_KINDS]
    if bad:
        raise ValueError(f"kinds {bad} cannot target selected weights: use {', '.join(VALIDATION_KINDS)} "
                         "(perturb.py's gaussian covers the whole slice and ignores `selection`)")
    if not seeds:
        raise ValueError("seeds must name at least one seed (random-k draws depend on it)")
    chosen_metrics = list(metrics) if metrics is not None else list(result.metrics)
    chosen_groups = list(groups) if groups is not None else [(g.component, g.layer) for g in result.groups]
    rows = []
    for component, layer in chosen_groups:
        group = result.group(component, layer)
        sizes = [s.numel() for s in group.scores[next(iter(group.scores))]]
        for kind, fraction in itertools.product(kinds, fractions):
            k = sum(selected_count(fraction, n) for n in sizes)
            base_row = {"model": result.model, "kind": kind, "component": component, "layer": layer,
                        "strength": float(fraction), "k": k}
            if "random" in selections:
                for seed in seeds:
                    p = Perturbation(kind, component, layer, fraction, seed, selection="random")
                    paired = evaluate_against(lm, base, p, adapter=adapter, cache=cache)
                    for metric in chosen_metrics:
                        rows.append(_row(base_row, metric, "random", seed, paired))
            for metric, selection in itertools.product(chosen_metrics, [s for s in selections if s != "random"]):
                p = Perturbation(kind, component, layer, fraction, seeds[0], selection=selection)
                paired = evaluate_against(lm, base, p, adapter=adapter, cache=cache,
                                          scores=result.scores_for(metric, component, layer))
                rows.append(_row(base_row, metric, selection, seeds[0], paired))
    df = pd.DataFrame(rows, columns=VALIDATION_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df


def _row(base_row: dict, metric: str, selection: str, seed: int, paired) -> dict:
    return {**base_row, "metric": metric, "selection": selection, "seed": seed, "delta_nll": paired.delta_nll,
            "ppl_ratio": paired.ppl_ratio, "relative_change": paired.relative_change,
            "changed_fraction": paired.changed_fraction, "restored": paired.restored}


def top_k_set(result: ImportanceResult, metric: str, component: str, layer: int | None, k: int) -> set:
    """(param_name, flat_index) of the k highest-scoring weights of one group."""
    group = result.group(component, layer)
    flats = [param_flat_indices(result.param_shapes[ps.param_name], ps).reshape(-1) for ps in group.slices]
    owner = torch.cat([torch.full((f.numel(),), i) for i, f in enumerate(flats)])  # [n] slice of each element
    all_flat = torch.cat(flats)  # [n]
    all_scores = torch.cat([sc.reshape(-1) for sc in result.scores_for(metric, component, layer)])  # [n]
    top = torch.topk(all_scores, min(k, all_scores.numel())).indices.tolist()
    return {(group.slices[int(owner[i])].param_name, int(all_flat[i])) for i in top}


def metric_overlap(result: ImportanceResult, k: int, metrics: Sequence[str] | None = None,
                   source: str = "") -> pd.DataFrame:
    """Jaccard of top-k sets between every pair of metrics, per (component, layer)."""
    chosen = list(metrics) if metrics is not None else list(result.metrics)
    rows = []
    for g in result.groups:
        available = [m for m in chosen if m in g.scores]
        sets = {m: top_k_set(result, m, g.component, g.layer, k) for m in available}
        for a, b in itertools.combinations(available, 2):
            rows.append({"component": g.component, "layer": g.layer, "metric_a": a, "metric_b": b,
                         "source_a": source, "source_b": source, "k": k, "jaccard": jaccard(sets[a], sets[b])})
    return _overlap_frame(rows)


def stability_overlap(result_a: ImportanceResult, result_b: ImportanceResult, k: int, *,
                      metrics: Sequence[str] | None = None, source_a: str = "a",
                      source_b: str = "b") -> pd.DataFrame:
    """Jaccard of top-k sets of the same metric in two results (data halves, seeds), per (component, layer)."""
    chosen = list(metrics) if metrics is not None else [m for m in result_a.metrics if m in result_b.metrics]
    rows = []
    for g in result_a.groups:
        for m in chosen:
            if m not in g.scores:
                continue
            a = top_k_set(result_a, m, g.component, g.layer, k)
            b = top_k_set(result_b, m, g.component, g.layer, k)
            rows.append({"component": g.component, "layer": g.layer, "metric_a": m, "metric_b": m,
                         "source_a": source_a, "source_b": source_b, "k": k, "jaccard": jaccard(a, b)})
    return _overlap_frame(rows)


def _overlap_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=OVERLAP_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df


def halves(base) -> tuple[list, list]:
    """The baseline's token windows split into first and second half (for data-stability overlap)."""
    windows = list(getattr(base, "token_windows", base))
    if len(windows) < 2:
        raise ValueError(f"need >= 2 windows to split the data in halves, got {len(windows)}: "
                         "evaluate more tokens or a shorter window")
    mid = len(windows) // 2
    return windows[:mid], windows[mid:]
