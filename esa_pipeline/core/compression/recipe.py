"""Mixed-precision (or non-uniform sparsity) recipes from measured sensitivity points, and the check that the
measured per-unit ΔNLLs add up when every unit is compressed at once.

Allocation. Units u = (layer, component) with n_u weights; each has measured options v (bits for `quantize`,
sparsity for `prune`) with measured ΔNLL c_{u,v}. Choose one option per unit minimising Σ_u c_{u,v(u)} subject to
Σ_u n_u·v(u) ≤ budget·Σ_u n_u (average bits per weight; for sparsity: ≥ target average sparsity). This is the
multiple-choice knapsack that HAWQ-V3 (Yao et al. 2021, "HAWQ-V3: Dyadic Neural Network Quantization", §3.4)
solves as an integer linear program; here it is solved exactly by scipy.optimize.milp (HiGHS). Only measured
options are offered (no implicit "keep 16 bits"), and options with a non-finite ΔNLL are left out.

Whole-recipe check. `apply_all` enters every assignment's `perturbed` context at once (each snapshots and
restores its own disjoint slices; the stack restores in reverse order and each verifies bit-equality) and
evaluates through the prefix cache from the lowest touched layer. `additivity` compares the measured ΔNLL with
the predicted sum Σ_u c_u: ratio = Σ_w measured_w / Σ_w predicted_w over the baseline's windows w, with a
percentile bootstrap CI resampling documents (windows of one document stay together, as everywhere in ESA).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from esa_pipeline.core.evaluation.paired import paired_metrics, paired_scores
from esa_pipeline.core.evaluation.scoring import touched_head_originals
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed, resolve_slices

RECIPE_COLUMNS = [
    "model", "dataset", "window_tokens", "kind", "allocation", "budget", "achieved", "n_units", "predicted_delta_nll",
    "measured_delta_nll", "measured_kl", "top1_agreement", "additivity_ratio", "ratio_ci_low", "ratio_ci_high",
    "n_windows", "n_docs", "restored", "method", "assignment_json", "random_weights", "note",
]  # fmt: skip
METHOD = "multiple-choice knapsack ILP (HAWQ-V3 §3.4), scipy.optimize.milp/HiGHS"


def choose_allocation(points: pd.DataFrame, budget: float, *, kind: str) -> pd.DataFrame:
    """One option per unit minimising the summed measured ΔNLL under the average budget.

    points: columns layer, component, value (bits or sparsity), delta_nll, n_params — one row per measured
    (unit, option). kind: "quantize" (Σ n·bits ≤ budget·Σ n) or "prune" (Σ n·sparsity ≥ budget·Σ n).
    Returns columns layer, component, value, delta_nll, n_params (one row per unit, layer-ordered).
    Raises ValueError for missing columns, an unknown kind, duplicated points, or an unreachable budget
    (naming the reachable range).
    """
    need = ["layer", "component", "value", "delta_nll", "n_params"]
    missing = [c for c in need if c not in points.columns]
    if missing:
        raise ValueError(f"choose_allocation needs columns {missing}; got {list(points.columns)}")
    if kind not in ("quantize", "prune"):
        raise ValueError(f"kind must be 'quantize' or 'prune', got {kind!r}")
    if points.duplicated(["layer", "component", "value"]).any():
        raise ValueError("points has several rows for one (layer, component, value): average seeds first")
    usable = points[np.isfinite(points["delta_nll"].astype(float))].reset_index(drop=True)
    units = usable[["layer", "component"]].drop_duplicates().sort_values(["layer", "component"])
    all_units = points[["layer", "component"]].drop_duplicates()
    if len(units) != len(all_units):
        raise ValueError("some units have no finite measured option: measure them or drop them from points")
    unit_index = {tuple(u): i for i, u in enumerate(units.itertuples(index=False))}
    n_params = usable.groupby(["layer", "component"])["n_params"].first()
    total = float(n_params.sum())
    sign = 1.0 if kind == "quantize" else -1.0  # prune: Σ n·s ≥ B·N  <=>  -Σ n·s ≤ -B·N
    weight = sign * usable["n_params"].to_numpy(float) * usable["value"].to_numpy(float)
    membership = np.zeros((len(units), len(usable)))
    for j, row in enumerate(usable.itertuples(index=False)):
        membership[unit_index[(row.layer, row.component)], j] = 1.0
    lo = usable.groupby(["layer", "component"]).apply(
        lambda g: (g["n_params"] * g["value"]).min(), include_groups=False).sum() / total
    hi = usable.groupby(["layer", "component"]).apply(
        lambda g: (g["n_params"] * g["value"]).max(), include_groups=False).sum() / total
    if (kind == "quantize" and budget < lo - 1e-12) or (kind == "prune" and budget > hi + 1e-12):
        raise ValueError(f"budget {budget} is unreachable with the measured options: reachable averages are "
                         f"{lo:.4g}..{hi:.4g}")
    result = milp(
        c=usable["delta_nll"].to_numpy(float),
        constraints=[LinearConstraint(membership, 1, 1), LinearConstraint(weight[None, :], -np.inf, sign * budget * total)],
        integrality=np.ones(len(usable)), bounds=Bounds(0, 1),
    )  # fmt: skip
    if not result.success:
        raise ValueError(f"the allocation ILP failed: {result.message}")
    chosen = usable[np.round(result.x).astype(bool)]
    return chosen[need].sort_values(["layer", "component"]).reset_index(drop=True)


def uniform_allocation(points: pd.DataFrame, value: float) -> pd.DataFrame:
    """Every unit at `value` (the uniform baseline), with its measured ΔNLL; raises if a unit lacks it."""
    units = points[["layer", "component"]].drop_duplicates()
    chosen = points[points["value"] == value]
    if len(chosen) != len(units):
        raise ValueError(f"value {value} is not measured for every unit ({len(chosen)} of {len(units)})")
    return chosen[["layer", "component", "value", "delta_nll", "n_params"]].sort_values(
        ["layer", "component"]).reset_index(drop=True)


def achieved(assignment: pd.DataFrame) -> float:
    """Parameter-weighted average of the assigned values (average bits per weight / sparsity)."""
    return float((assignment["n_params"] * assignment["value"]).sum() / assignment["n_params"].sum())


def recipe_specs(assignment: pd.DataFrame, kind: str, **params: Any) -> list[Perturbation]:
    """One spec per assigned unit: quantize needs mode (scheme) and group_size; prune needs mode (method)."""
    return [Perturbation(kind, row.component, int(row.layer), float(row.value), 0, **params)
            for row in assignment.itertuples(index=False)]  # fmt: skip


def recipe_json(assignment: pd.DataFrame, *, model: str, kind: str, budget: float, params: dict) -> str:
    """The assignment as JSON: {model, kind, budget, achieved, method, params, assignments: [{layer, ...}]}."""
    return json.dumps({
        "model": model, "kind": kind, "budget": budget, "achieved": achieved(assignment), "method": METHOD,
        "params": params,
        "assignments": [{"layer": int(r.layer), "component": r.component, "value": float(r.value),
                         "measured_delta_nll": float(r.delta_nll), "n_params": int(r.n_params)}
                        for r in assignment.itertuples(index=False)],
    }, sort_keys=True)  # fmt: skip


def unit_params(model: torch.nn.Module, adapter: Any, p: Perturbation) -> int:
    """Weights a spec touches (what the budget averages over)."""
    return sum(s.get(model).numel() for s in resolve_slices(adapter, p))


def apply_all(lm: Any, base: Any, specs: list[Perturbation], *, cache: Any,
              scores: dict[Perturbation, list[torch.Tensor]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every spec applied at once, evaluated on `base`'s windows (prefix cache from the lowest touched layer),
    restored and verified. Returns paired_metrics fields plus restored, used_prefix_cache, elapsed_s.
    Raises ValueError if two specs touch the same parameter region (their restores would interfere)."""
    model = cache.model
    seen: set[tuple] = set()
    for p in specs:
        for s in resolve_slices(cache.adapter, p):
            key = (s.param_name, s.view_shape, repr(s.index))
            if key in seen:
                raise ValueError(f"two specs of the recipe touch {s.param_name} {s.index}: one spec per unit")
            seen.add(key)
    starts = [cache.start_layer(p) for p in specs] if cache.enabled else [None]
    start = None if any(s is None for s in starts) else min(starts)  # type: ignore[type-var]
    touched = [s.param_name for p in specs for s in resolve_slices(cache.adapter, p)]
    originals = touched_head_originals(model, cache.adapter, touched)  # the baseline's head, for exact KL
    started = time.perf_counter()
    with ExitStack() as stack:
        reports = [stack.enter_context(perturbed(model, cache.adapter, p, (scores or {}).get(p))) for p in specs]
        pert = paired_scores(model, cache.adapter, base, cache.batches, cache=cache, start_layer=start,
                             originals=originals)  # fmt: skip
    result = paired_metrics(base, pert)
    result.update(restored=all(r.restored for r in reports), used_prefix_cache=start is not None,
                  elapsed_s=time.perf_counter() - started)  # fmt: skip
    return result


def additivity(measured_windows: pd.DataFrame, point_windows: pd.DataFrame, assignment: pd.DataFrame,
               doc_of_window: dict[int, str], *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """measured/predicted ΔNLL ratio with a document-cluster bootstrap 95% CI.

    measured_windows: window_id, delta_nll_sum, n_tokens of the whole-recipe run. point_windows: window_id,
    layer, component, value, delta_nll_sum of the single-unit points (sensitivity_windows with value = strength).
    The predicted per-window sum adds the assigned units' window sums. The ratio is NaN, with the reason in
    `note`, when a sum is non-finite or the predicted total is <= 0 (a negative prediction — units that measured
    below 0 — makes measured/predicted a number with no additivity meaning); the CI is NaN, with the reason,
    with fewer than 2 documents or when some document resample's predicted sum is <= 0.
    """
    keyed = point_windows.merge(assignment[["layer", "component", "value"]], on=["layer", "component", "value"])
    found = keyed[["layer", "component"]].drop_duplicates()
    if len(found) != len(assignment):
        raise ValueError(f"window sums found for {len(found)} of {len(assignment)} assigned units")
    predicted = keyed.groupby("window_id")["delta_nll_sum"].sum()
    frame = measured_windows.set_index("window_id")[["delta_nll_sum", "n_tokens"]].join(
        predicted.rename("predicted"), how="left").fillna({"predicted": 0.0})
    frame["doc"] = [doc_of_window[w] for w in frame.index]
    by_doc = frame.groupby("doc")[["delta_nll_sum", "predicted", "n_tokens"]].sum()
    m, p = by_doc["delta_nll_sum"].to_numpy(), by_doc["predicted"].to_numpy()
    n_tokens = by_doc["n_tokens"].sum()
    out = {"predicted_delta_nll": float(p.sum() / n_tokens), "measured_delta_nll": float(m.sum() / n_tokens),
           "additivity_ratio": math.nan, "ratio_ci_low": math.nan, "ratio_ci_high": math.nan,
           "n_windows": len(frame), "n_docs": len(by_doc), "note": ""}  # fmt: skip
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        out["note"] = "non-finite ΔNLL (loss overflowed): no ratio"
        return out
    if p.sum() <= 0:
        out["note"] = (f"predicted ΔNLL {out['predicted_delta_nll']:.3g} <= 0: measured/predicted is not an "
                       "additivity ratio (compare the two ΔNLLs)")  # fmt: skip
        return out
    out["additivity_ratio"] = float(m.sum() / p.sum())
    if len(by_doc) < 2:
        out["note"] = f"{len(by_doc)} document: no bootstrap CI (it resamples documents)"
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(by_doc), size=(n_boot, len(by_doc)))
    resampled = p[idx].sum(axis=1)
    if (resampled <= 0).any():
        out["note"] = "the predicted sum is <= 0 in some document resamples: no bootstrap CI"
        return out
    ratios = m[idx].sum(axis=1) / resampled
    out["ratio_ci_low"], out["ratio_ci_high"] = (float(x) for x in np.percentile(ratios, [2.5, 97.5]))
    return out
