"""Zero-shot task accuracy under perturbation (per model), its paired statistics and the task-vs-perplexity view.

The asset builds the points of the experiment's `zero_shot.at` (a grid and/or the sweep's top-ΔNLL points plus
random controls), scores every task item before and after each point (core/evaluation/zeroshot_points.py) and
writes four relations: `zero_shot_sensitivity` (per item), `zero_shot_significance` (per point and task),
`task_vs_perplexity` (per model and task) and `task_vs_perplexity_points` (per point).
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

from esa_pipeline.defs.analysis_assets import current_rows
from esa_pipeline.defs.common import EAGER_AFTER_SWEEP, ON_GPU, model_step, number, table_preview
from esa_pipeline.defs.loaded import forget_models
from esa_pipeline.defs.model_assets import baseline
from esa_pipeline.defs.partitions import model_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sweep_assets import sensitivity

RELATIONS = ("zero_shot_sensitivity", "zero_shot_significance", "task_vs_perplexity", "task_vs_perplexity_points")


def _restored_check(rows: pd.DataFrame) -> AssetCheckResult:
    points = rows.drop_duplicates(["task", "kind", "component", "layer", "strength", "seed"]) if len(rows) else rows
    bad = points.loc[points["restored"] != True] if len(points) else points  # noqa: E712
    return AssetCheckResult(
        check_name="every_point_restored", passed=bad.empty, severity=AssetCheckSeverity.ERROR,
        metadata={"points": len(points), "unrestored_points": len(bad)},
    )  # fmt: skip


@asset(
    partitions_def=model_partitions,
    deps=[sensitivity, baseline],
    group_name="analysis",
    automation_condition=EAGER_AFTER_SWEEP,
    **ON_GPU,
    check_specs=[AssetCheckSpec("every_point_restored", asset="zero_shot_sensitivity", blocking=True,
                                description="The weights were restored bit-identical after every zero-shot point")],
    description="Task accuracy item by item at the zero_shot.at points (paired with the baseline): exact McNemar, "
    "paired CI, Holm/BH; rank correlation of ΔNLL vs Δaccuracy and the points where they disagree.",
)  # fmt: skip
def zero_shot_sensitivity(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    step = model_step(context.partition_key, experiment, store, "zero_shot_sensitivity")
    plan, model = step.plan, step.model
    at = plan.zero_shot.at
    if at is None or not plan.zero_shot.tasks:
        reason = "zero_shot.at is not set in the experiment" if at is None else "zero_shot.tasks is empty"
        context.log.info(f"{model}: {reason}; no zero-shot points measured")
        return MaterializeResult(metadata={"config_hash": step.config_hash, "rows": 0, "not_configured": reason},
                                 check_results=[AssetCheckResult(check_name="every_point_restored", passed=True,
                                                                 metadata={"not_configured": reason})])  # fmt: skip

    from esa_pipeline.core.analysis.zero_shot_stats import task_vs_perplexity, zero_shot_summary
    from esa_pipeline.core.evaluation.zeroshot_points import McSuite, select_points, zero_shot_points

    lm, adapter = step.load()
    sens = None
    if at.top_delta_nll or at.random_controls or step.store.model_partitions("sensitivity", model):
        sens = current_rows(step, "sensitivity")
        sens = sens.loc[sens["dataset"] == plan.sweep_dataset]
    specs, labels = select_points(at, model=model, n_layers=adapter.num_layers, seeds=list(plan.seeds),
                                  sensitivity=sens, neuron_mode=plan.neuron_mode)  # fmt: skip
    suite = McSuite.build(lm, list(plan.zero_shot.tasks), limit=plan.zero_shot.limit,
                          num_fewshot=plan.zero_shot.num_fewshot, batch_size=plan.batch_size, adapter=adapter)  # fmt: skip
    context.log.info(f"{model}: {len(specs)} zero-shot points x {len(suite.items)} items "
                     f"({len(suite.requests)} requests, {suite.n_join_merged} merged at the join)")  # fmt: skip
    rows = zero_shot_points(suite, specs, selected_by=labels, log=lambda line: context.log.info(f"{model}: {line}"))
    if not (rows["restored"] == True).all():  # noqa: E712
        forget_models()  # the cached weights can no longer be trusted as the unperturbed model
    summary = zero_shot_summary(rows)
    if sens is not None and len(sens):
        correlations, disagreements = task_vs_perplexity(summary, sens)
    else:
        correlations, disagreements = task_vs_perplexity(summary, pd.DataFrame(columns=[
            "model", "kind", "component", "layer", "expert", "strength", "seed", "mode", "selection", "delta_nll"]))
    n_rows = step.write("zero_shot_sensitivity", rows)
    step.write("zero_shot_significance", summary)
    step.write("task_vs_perplexity", correlations)
    step.write("task_vs_perplexity_points", disagreements)
    pooled = correlations.loc[correlations["task"] == "all"]
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": n_rows,
            "points": len(specs),
            "items": len(suite.items),
            "scorer": str(rows["scorer"].iloc[0]) if len(rows) else "none",
            "elapsed_s": number(rows.drop_duplicates(["kind", "component", "layer", "strength", "seed"])["elapsed_s"].sum()),
            "spearman_rho_all": number(pooled["spearman_rho"].iloc[0]) if len(pooled) else None,
            "accuracy": table_preview(summary, ["task", "kind", "component", "layer", "strength", "seed",
                                                "accuracy_before", "accuracy_after", "delta_accuracy", "ci_low",
                                                "ci_high", "mcnemar_p", "p_holm"], limit=30),
            "disagreement": table_preview(disagreements.loc[disagreements["task"] == "all"],
                                          ["kind", "component", "layer", "strength", "seed", "delta_nll",
                                           "delta_accuracy", "disagreement", "direction"], limit=10),
        },  # fmt: skip
        check_results=[_restored_check(rows)],
    )
