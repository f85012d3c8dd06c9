"""A whole compression study on one model and baseline, sharing one prefix cache:

  1. quantize sweep: every (layer, matrix component) at each bit width (one scheme and group size);
  2. prune sweep: every (layer, matrix component) at each sparsity (one method);
  3. layer_drop: every layer's whole block, attention and MLP sub-block;
  4. Block Influence / angular distance from the cache (no extra forward) and its rank agreement with (3);
  5. a bit recipe at `bit_budget` average bits and a sparsity recipe at `sparsity_target` from (1)/(2), each
     applied whole and compared with its predicted sum, next to the uniform baseline at the same average.
Returns the rows of the relations `sensitivity`, `sensitivity_windows`, `block_influence`,
`layer_drop_agreement` and `compression_recipe` (README documents their columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from esa_pipeline.core.analysis.block_influence import layer_drop_agreement, layer_similarity
from esa_pipeline.core.compression.recipe import (
    METHOD,
    RECIPE_COLUMNS,
    achieved,
    additivity,
    apply_all,
    choose_allocation,
    recipe_json,
    recipe_specs,
    uniform_allocation,
    unit_params,
)
from esa_pipeline.core.evaluation.perplexity import PerplexityResult, unwrap
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.sweep import run_sweep
from esa_pipeline.core.perturbation.layer_drop import LAYER_DROP_COMPONENTS
from esa_pipeline.core.perturbation.perturb import Perturbation


def matrix_components(adapter: Any) -> list[str]:
    """Per-layer weight matrices a recipe quantizes/prunes: attention and FFN projections (no norms, router)."""
    return [c for c in adapter.components() if c.startswith(("attention.", "ffn.")) and "norm" not in c]


def _check_selection(adapter: Any, **selections: Sequence) -> None:
    """Raises ValueError for an empty or repeated selection or a span the model lacks, before any work: Block
    Influence comes after every sweep, and a repeated unit is refused only by the recipe."""
    n = adapter.num_layers
    for key, values in selections.items():
        if key != "sparsities" and not len(values):
            raise ValueError(f"{key}: no {key.rstrip('s')} to study; pass at least one")
        if len(set(values)) != len(values):
            raise ValueError(f"{key} repeat ({list(values)}); list each once")
    if any(int(s) != s or not 1 <= s <= n for s in selections["spans"]):
        raise ValueError(f"spans must be integers in 1..{n} (the model has {n} layers), got {list(selections['spans'])}")


def compression_study(
    lm: Any, base: PerplexityResult, *, layers: Sequence[int] | None = None, components: Sequence[str] | None = None,
    bits: Sequence[int] = (3, 4, 8), scheme: str = "symmetric", group_size: int = 32,
    sparsities: Sequence[float] = (0.25, 0.5, 0.75), prune_method: str = "magnitude",
    bit_budget: float = 4.0, sparsity_target: float = 0.5, spans: Sequence[int] = (1,),
    prune_scores: Callable[[Perturbation], list | None] | None = None, log: Callable[[str], None] | None = None,
) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Runs steps 1-5 of the module docstring. `bit_budget` must be one of `bits` and `sparsity_target` one of
    `sparsities` (the uniform baselines are measured points); empty `sparsities` skips pruning. prune_scores: Wanda scores per spec (needed
    for prune_method "wanda"). Raises ValueError for such mismatches before any work starts."""
    if bit_budget not in bits or (sparsities and sparsity_target not in sparsities):
        raise ValueError(f"bit_budget {bit_budget} must be one of bits {list(bits)} and sparsity_target "
                         f"{sparsity_target} one of sparsities {list(sparsities)}: the uniform baseline is measured")
    if prune_method == "wanda" and prune_scores is None:
        raise ValueError("prune_method 'wanda' needs prune_scores (importance metric 'activation')")
    model, _, spec = unwrap(lm)
    from esa_pipeline.core.models.adapters import adapter_for

    adapter = adapter_for(model)
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    components = matrix_components(adapter) if components is None else list(components)
    _check_selection(adapter, layers=layers, components=components, bits=bits, sparsities=sparsities, spans=spans)
    q_specs = [Perturbation("quantize", c, layer, b, 0, mode=scheme, group_size=group_size)
               for layer in layers for c in components for b in bits]  # fmt: skip
    p_specs = [Perturbation("prune", c, layer, s, 0, mode=prune_method)
               for layer in layers for c in components for s in sparsities]  # fmt: skip
    d_specs = [Perturbation("layer_drop", c, layer, 1.0, 0) for layer in layers for c in LAYER_DROP_COMPONENTS]
    for layer in layers:  # every unit exists (layer range, component on this architecture) before any work
        for component in components:
            adapter.slices(component, layer)
    cache = PrefixCache.build(lm, base, adapter)
    if not cache.enabled:  # step 4 reads its captured streams: fail now, not after every sweep point
        raise ValueError(f"Block Influence needs the prefix cache, which is disabled ({cache.reason}): lower "
                         "compression.token_budget (or the window) so the captured streams fit")
    frames, windows = [], []
    for name, specs, scores in (("quantize", q_specs, None), ("prune", p_specs, prune_scores),
                                ("layer_drop", d_specs, None)):  # fmt: skip
        if not specs:
            continue
        if log is not None:
            log(f"{name}: {len(specs)} points")
        rows, win = run_sweep(lm, base, specs, adapter=adapter, cache=cache, log=log, scores=scores)
        frames.append(rows)
        windows.append(win)
    sensitivity = pd.concat(frames, ignore_index=True)
    sensitivity_windows = pd.concat(windows, ignore_index=True)
    similarity = layer_similarity(cache, spans)
    agreement = layer_drop_agreement(similarity, sensitivity)

    doc_of_window = {w.window_id: w.doc_id for w in base.token_windows}
    context = {"model": getattr(spec, "name", base.model), "dataset": base.dataset, "window_tokens": base.window,
               "random_weights": getattr(spec, "random_weights", base.random_weights)}  # fmt: skip
    recipes = []
    for kind, budget, params in (("quantize", bit_budget, {"mode": scheme, "group_size": group_size}),
                                 ("prune", sparsity_target, {"mode": prune_method})):  # fmt: skip
        if kind == "prune" and not sparsities:
            continue
        points = sensitivity[sensitivity["kind"] == kind].rename(columns={"strength": "value"}).copy()
        points["n_params"] = [unit_params(model, adapter, Perturbation(kind, c, int(layer), v, 0, **params))
                              for c, layer, v in zip(points["component"], points["layer"], points["value"],
                                                     strict=True)]  # fmt: skip
        pw = sensitivity_windows[sensitivity_windows["kind"] == kind].rename(columns={"strength": "value"})
        for allocation, assignment in (("recipe", choose_allocation(points, budget, kind=kind)),
                                       ("uniform", uniform_allocation(points, budget))):  # fmt: skip
            specs = recipe_specs(assignment, kind, **params)
            measured = apply_all(lm, base, specs, cache=cache,
                                 scores=None if prune_scores is None or kind != "prune"
                                 else {p: prune_scores(p) for p in specs})  # fmt: skip
            check = additivity(measured["windows"], pw, assignment, doc_of_window)
            recipes.append({
                **context, "kind": kind, "allocation": allocation, "budget": budget, "achieved": achieved(assignment),
                "n_units": len(assignment), **check, "measured_kl": measured["kl"],
                "top1_agreement": measured["top1_agreement"], "restored": measured["restored"],
                "method": METHOD if allocation == "recipe" else "uniform",
                "assignment_json": recipe_json(assignment, model=context["model"], kind=kind, budget=budget,
                                               params=params),
            })  # fmt: skip
            if log is not None:
                log(f"{kind} {allocation} at {budget}: predicted {check['predicted_delta_nll']:.4f}, measured "
                    f"{check['measured_delta_nll']:.4f}, ratio {check['additivity_ratio']:.3f} {check['note']}")
    return {
        "sensitivity": sensitivity, "sensitivity_windows": sensitivity_windows, "block_influence": similarity,
        "layer_drop_agreement": agreement, "compression_recipe": pd.DataFrame(recipes, columns=RECIPE_COLUMNS),
    }  # fmt: skip
