"""Per-model analysis: significance and seed consistency, critical layers, weight importance, MoE routing.

Each reads the model's rows whose partition hash is current (core.config.partition_hash) from the store, so
stale partitions of an older configuration never mix into a result.
"""


import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from esa_pipeline.core.config import prediction_sigmas, routing_strengths, select_layers
from esa_pipeline.defs.common import (
    EAGER_AFTER_SWEEP,
    PER_MODEL_ON_GPU,
    ModelStep,
    eager_on_own_version,
    model_step,
    number,
    table_preview,
)
from esa_pipeline.defs.loaded import baseline_result
from esa_pipeline.defs.model_assets import baseline, model_card
from esa_pipeline.defs.partitions import model_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sources import importance_config, routing_config
from esa_pipeline.defs.sweep_assets import sensitivity


def current_rows(step: ModelStep, relation: str) -> pd.DataFrame:
    """The model's rows computed under the current settings of their partitions; a clear error when none."""
    rows = step.current(relation)
    if rows.empty:
        raise FileNotFoundError(
            f"no {relation} rows for {step.model} under its current settings: materialize the {relation} "
            f"partitions of {step.model} first (older rows are from a different configuration)"
        )
    return rows


@asset(
    partitions_def=model_partitions,
    deps=[sensitivity],
    group_name="analysis",
    automation_condition=EAGER_AFTER_SWEEP,
    check_specs=[AssetCheckSpec("significance_quality", asset="significance",
                                description="Every cell was tested (warns on any untested cell, with the reasons)")],
    description="Across-draw (seed × document) and conditional (clustered by document) tests per cell, Holm/BH "
    "across the sweep; untested cells NULL with a reason; seed spread and consistency; dose-response slopes.",
)  # fmt: skip
def significance(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.analysis import dose_response, seed_consistency
    from esa_pipeline.core.analysis import significance as significance_test

    step = model_step(context.partition_key, experiment, store, "significance")
    sens = current_rows(step, "sensitivity")
    windows = current_rows(step, "sensitivity_windows")
    tested = significance_test(windows, sens)
    consistency = seed_consistency(sens)
    n_rows = step.write("significance", tested)
    step.write("seed_consistency", consistency)
    slopes = dose_response(sens)  # empty when no cell has >= 3 strengths
    step.write("dose_response", slopes)

    # untested = no headline decision (NULL significant_bh): overflowed, too few documents, one seed, ...
    untested = int(tested["significant_bh"].isna().sum())
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": n_rows,
            "significant_holm": int(tested["significant_holm"].fillna(False).sum()),
            "significant_bh": int(tested["significant_bh"].fillna(False).sum()),
            "significant_bh_conditional": int(tested["conditional_significant_bh"].fillna(False).sum()),
            "untested_cells": untested,
            "cluster_unit": ", ".join(sorted(tested["cluster_unit"].unique())) if len(tested) else "none",
            "min_clusters": int(tested["n_clusters"].min()) if len(tested) else 0,
            "median_seed_rho": number(consistency["spearman_rho"].median()) if len(consistency) else None,
            "dose_response_rows": len(slopes),
            "median_dose_slope": number(slopes["slope"].median()) if slopes["slope"].notna().any() else None,
            "non_monotone_cells": int((~slopes["monotone"].astype(bool)).sum()),
            "top_cells": table_preview(tested.sort_values("mean_delta_nll", ascending=False),
                                       ["kind", "component", "layer", "strength", "mean_delta_nll", "ci_low",
                                        "ci_high", "p_holm", "test_used", "note"], limit=10),
        },  # fmt: skip
        check_results=[
            AssetCheckResult(
                check_name="significance_quality",
                passed=len(tested) > 0 and untested == 0,  # any untested cell is worth a warning
                severity=AssetCheckSeverity.WARN,
                metadata={"cells": len(tested), "untested_cells": untested,
                          "untested_reasons": "; ".join(sorted(set(tested.loc[tested["significant_bh"].isna(),
                                                                            "note"]))) or "none"},
            )
        ],
    )


@asset(
    partitions_def=model_partitions,
    deps=[significance, model_card],
    group_name="analysis",
    automation_condition=EAGER_AFTER_SWEEP,
    description="Layers ranked by seed-averaged ΔNLL per component and overall; critical = significant after "
    "correction (or overflowed) and in the top 10%; random-weight models get none.",
)
def critical_layers(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.analysis import critical_layers as rank_layers

    step = model_step(context.partition_key, experiment, store, "critical_layers")
    tested = current_rows(step, "significance")
    cards = current_rows(step, "models")
    ranked = rank_layers(tested, cards)
    n_rows = step.write("critical_layers", ranked)
    overall = ranked.loc[(ranked["component"] == "all") & ranked["is_critical"]]
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": n_rows,
            "critical_overall": ", ".join(
                f"{r.kind}@{r.strength}: L{r.layer}" for r in overall.itertuples()
            ) or "none",
            "random_weights": bool(cards["random_weights"].fillna(False).astype(bool).any()),
            "ranking": table_preview(ranked.loc[ranked["component"] == "all"],
                                     ["kind", "strength", "layer", "depth", "mean_delta_nll", "significant", "rank",
                                      "is_critical", "note"]),
        }  # fmt: skip
    )


def validate_and_find_super_weights(context, step: ModelStep, lm, adapter, base, result, cache) -> dict:
    """Causal validation (top-k vs random-k vs bottom-k) at each component's middle swept layer, and super
    weights (spike candidates, each zeroed against 10 matched controls: confirm_super_weights).

    One layer per component keeps the smoke profile in minutes: every (metric, kind, selection) is a full point.
    """
    from esa_pipeline.core.importance.super_weights import find_super_weights
    from esa_pipeline.core.importance.validation import validate_importance

    model, plan = step.model, step.plan
    groups = sorted({(g.component, g.layer) for g in result.groups}, key=str)
    middle = {}
    for component, layer in groups:
        middle.setdefault(component, []).append(layer)
    chosen = [(c, sorted(ls)[len(ls) // 2]) for c, ls in middle.items() if not c.startswith("norm.")]
    # A metric that could not be computed for a group (activation on fused MoE experts) is not validated there.
    metrics = [m for m in result.metrics if all(m in result.group(c, layer).scores for c, layer in chosen)]
    checked = validate_importance(lm, base, result, metrics=metrics, fractions=[plan.importance.validation_fraction],
                                  seeds=list(plan.seeds), groups=chosen, adapter=adapter, cache=cache)  # fmt: skip
    step.write("importance_validation", checked)
    context.log.info(f"{model}: importance validation, {len(checked)} points on {chosen}")
    metadata: dict = {"validation_rows": len(checked)}
    if lm.spec.is_moe:  # find_super_weights hooks 2-D down projections; fused 3-D experts have none
        metadata["super_weights"] = "not searched: fused MoE experts have no per-layer down-projection linear"
    elif adapter.num_layers >= 3 and "ffn.down" in adapter.components():
        from esa_pipeline.core.importance.super_weights import confirm_super_weights

        # a spike is a candidate; only zeroing it against matched controls makes it a super weight
        supers = confirm_super_weights(lm, base, find_super_weights(lm, base, adapter=adapter), adapter=adapter,
                                       cache=cache, seed=int(plan.seeds[0]))  # fmt: skip
        step.write("super_weights", supers)
        metadata["super_weights_confirmed"] = int(supers["confirmed"].sum())
        metadata["super_weights"] = table_preview(supers, ["layer", "row", "col", "weight_value", "spike_ratio",
                                                           "zero_delta_nll", "control_max", "control_p", "status"])  # fmt: skip
    else:
        metadata["super_weights"] = f"not searched: {adapter.num_layers} layers / no ffn.down"
    return metadata


@asset(
    **PER_MODEL_ON_GPU,
    automation_condition=eager_on_own_version("baseline"),
    deps=[baseline, importance_config],
    group_name="importance",
    description="Per-weight importance (grad x weight, grad², Hutchinson, magnitude, activation), top-k per layer; "
    "small-sigma prediction vs measured ΔNLL.",
)
def weight_importance(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.importance.metrics import importance_scores, top_k

    step = model_step(context.partition_key, experiment, store, "weight_importance")
    model, plan = step.model, step.plan
    lm, adapter = step.load()
    # Scored on the sweep dataset's own windows (a smaller budget), so predictions compare like with like.
    base = baseline_result(plan, plan.sweep_dataset, plan.importance.token_budget)
    components = [c for c in plan.components if adapter.accepts(c)]
    layers = select_layers(plan.layers, adapter.num_layers)
    metrics = list(plan.importance.metrics)
    context.log.info(f"{model}: scoring {metrics} on {len(components)} components x {len(layers)} layers "
                     f"over {base.n_tokens} tokens")  # fmt: skip
    result = importance_scores(lm, adapter, base, metrics, components=components, layers=layers,
                               hutchinson_samples=plan.importance.hutchinson_samples)
    rows = pd.concat(
        [top_k(result, plan.importance.top_k, scope="layer"), top_k(result, plan.importance.top_k, scope="global")],
        ignore_index=True,
    )
    n_rows = step.write("weight_importance", rows)
    from esa_pipeline.core.evaluation.prefix_cache import PrefixCache

    # Every causal point below resumes from the perturbed layer, as sweeps do.
    cache = PrefixCache.build(lm, base, adapter)
    metadata = validate_and_find_super_weights(context, step, lm, adapter, base, result, cache)
    curvature = next((c for c in ("grad_sq", "hutchinson") if c in metrics), None)
    small_sigmas = prediction_sigmas(plan)  # the expansion holds for small sigma only
    if curvature and small_sigmas:
        from esa_pipeline.core.importance.prediction import prediction_check

        # each seed is an antithetic ± pair (two evaluations): half the seeds keep the cost of plain draws
        pair_seeds = list(plan.seeds)[: max(1, len(plan.seeds) // 2)]
        checked = prediction_check(lm, base, result, small_sigmas, seeds=pair_seeds, curvature=curvature,
                                   adapter=adapter, cache=cache, antithetic=True)  # fmt: skip
        step.write("prediction_check", checked)
        metadata["prediction_median_ratio"] = number(checked["ratio"].median()) if checked["ratio"].notna().any() else None
        metadata["prediction_below_noise_floor"] = int(checked["below_noise_floor"].sum())
        metadata["prediction"] = table_preview(checked, ["component", "layer", "strength", "predicted_delta_nll",
                                                         "measured_delta_nll", "noise_floor", "ratio"])  # fmt: skip
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": n_rows,
            "metrics": ", ".join(result.metrics),
            "scored_tokens": result.n_tokens,
            "notes": "; ".join(result.notes) or "none",
            "global_top": table_preview(rows.loc[rows["scope"] == "global"].sort_values("rank"),
                                        ["metric", "component", "layer", "param_name", "row", "col", "score", "rank"]),
            **metadata,
        }  # fmt: skip
    )


@asset(
    **PER_MODEL_ON_GPU,
    automation_condition=eager_on_own_version("baseline"),
    deps=[baseline, routing_config],
    group_name="importance",
    description="MoE routing under router noise: expert-selection change rate and load entropy (dense: not applicable).",
)
def moe_routing(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    step = model_step(context.partition_key, experiment, store, "moe_routing")
    model, plan, config_hash = step.model, step.plan, step.config_hash
    lm, adapter = step.load()
    if "moe.router" not in adapter.components():
        context.log.info(f"{model}: {adapter.architecture} has no router; moe_routing is not applicable")
        return MaterializeResult(
            metadata={"config_hash": config_hash, "rows": 0, "not_applicable": f"{adapter.architecture} is dense"}
        )

    from esa_pipeline.core.importance.routing import routing_sweep

    base = baseline_result(plan, plan.sweep_dataset)
    layers = select_layers(plan.layers, adapter.num_layers)
    rows = routing_sweep(lm, base, routing_strengths(plan), list(plan.seeds), layers=layers, adapter=adapter)
    n_rows = step.write("moe_routing", rows)
    return MaterializeResult(
        metadata={
            "config_hash": config_hash,
            "rows": n_rows,
            "max_expert_change_rate": number(rows["expert_change_rate"].max()) if len(rows) else None,
            "routing": table_preview(rows, ["layer", "strength", "seed", "expert_change_rate", "delta_nll"]),
        }
    )
