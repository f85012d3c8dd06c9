"""The sensitivity sweep: one partition = one model x one `<component>__<seed>` or `<component>__fixed` variant.

Inside a partition every selected layer x every kind of the variant x every strength is measured against the
baseline of the same windows (gaussian everywhere; neurons for ffn.*, scale for norm.*, router for moe.router).
Kinds whose points do not depend on the seed (norm scale; top/bottom neurons zeroed) are measured once, in
`<component>__fixed`, and stored with seed NULL; the seed variants hold the stochastic kinds.
"""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
)

from esa_pipeline.core.config import ModelPlan, parse_variant, select_experts, select_layers
from esa_pipeline.core.models.adapters.base import EXPERT_COMPONENTS, GLOBAL_COMPONENTS
from esa_pipeline.defs.common import (
    ON_GPU,
    eager_on_own_version,
    model_step,
    number,
    table_preview,
    with_model,
)
from esa_pipeline.defs.loaded import LOAD_COUNT, baseline_result, forget_models, prefix_cache
from esa_pipeline.defs.model_assets import baseline
from esa_pipeline.defs.partitions import split_sweep_key, sweep_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sources import sweep_plan


def sweep_specs(plan: ModelPlan, component: str, seed: int | None, layers: list[int | None],
                experts: list[int | None] | None = None) -> list:
    """Perturbation specs of one partition, in layer order (the prefix cache resumes from each layer).

    `experts` (MoE, from the plan's `experts:`) repeats every point per expert on expert-level components
    (ffn.gate/up/down, moe.router); None / [None] perturbs all experts at once. `seed` None: the
    seed-independent kinds of `<component>__fixed` (ModelPlan.kinds_of_variant), with perturb.UNUSED_SEED (stored as seed NULL)."""
    from esa_pipeline.core.perturbation.perturb import UNUSED_SEED, Perturbation

    per_expert = experts if experts is not None and component in EXPERT_COMPONENTS else [None]
    specs = []
    for layer in layers:
        for expert in per_expert:
            for kind in plan.kinds_of_variant(component, seed):
                neuron = kind == "neurons"
                extra = dict(mode=plan.neuron_mode, noise_sigma=plan.neuron_sigma,
                             selection=plan.neuron_selection) if neuron else {}
                for strength in getattr(plan.strengths, kind):
                    specs.append(Perturbation(kind=kind, component=component, layer=layer, strength=strength,
                                              seed=UNUSED_SEED if seed is None else seed,
                                              expert=expert, **extra))  # fmt: skip
    return specs


# A backfill of one model's sweep partitions runs them in one process (up to this many per run): the model is
# loaded, and its baseline and prefix cache built, once per run instead of once per partition.
SWEEP_PARTITIONS_PER_RUN = 64


@asset(
    partitions_def=sweep_partitions,
    deps=[baseline, sweep_plan],
    group_name="sweep",
    automation_condition=eager_on_own_version("baseline"),
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SWEEP_PARTITIONS_PER_RUN),
    **ON_GPU,
    check_specs=[
        AssetCheckSpec(
            "every_row_restored",
            asset="sensitivity",
            blocking=True,
            description="Every perturbed slice was restored bit-identical after its point",
        ),
    ],  # fmt: skip
    description="ΔNLL, PPL ratio, KL, top-1 agreement per layer x kind x strength for one component and seed "
    "(or, for seed-independent kinds, once: variant <component>__fixed, seed NULL).",
)
def sensitivity(
    context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource
) -> MaterializeResult:
    # A run covers one partition or a range of them (a backfill): each is measured and stored on its own, with its
    # own partition hash; the loaded model and its baseline are shared through defs.loaded's per-process cache.
    keys = context.partition_keys
    outcomes = [sweep_partition(context, key, experiment, store) for key in keys]
    if len(outcomes) == 1:
        return outcomes[0]
    rows = [o.metadata["rows"] for o in outcomes]
    failed = [
        (key, o.check_results[0])
        for key, o in zip(keys, outcomes, strict=True)
        if not o.check_results[0].passed
    ]
    return MaterializeResult(
        metadata={
            "partitions": len(keys),
            "process_model_loads": LOAD_COUNT["loads"],  # models this step's process loaded so far (all runs)
            "rows": sum(int(r.value if hasattr(r, "value") else r) for r in rows),
            "partition_hashes": MetadataValue.json(
                {str(k): o.metadata["config_hash"] for k, o in zip(keys, outcomes, strict=True)}
            ),
        },  # fmt: skip
        check_results=[
            AssetCheckResult(
                check_name="every_row_restored",
                passed=not failed,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "partitions": len(keys),
                    "process_model_loads": LOAD_COUNT["loads"],
                    "failed_partitions": ", ".join(str(k) for k, _ in failed) or "none",
                },
            )
        ],  # fmt: skip
    )


def sweep_partition(context: AssetExecutionContext, partition_key: str, experiment: ExperimentResource,
                    store: StoreResource) -> MaterializeResult:  # fmt: skip
    """Measure and store one (model, variant) partition; its metadata and check result."""
    model, variant = split_sweep_key(partition_key)
    component, seed = parse_variant(variant)
    step = model_step(model, experiment, store, "sensitivity", variant)
    plan, config_hash = step.plan, step.config_hash
    partition = str(partition_key)

    from esa_pipeline.core.evaluation.sweep import run_sweep

    lm, adapter = step.load()
    if not adapter.accepts(component) or variant not in plan.variants():
        # Not requested by automation (sweep_plan is never observed for it); a manual run says so explicitly.
        if not adapter.accepts(component):
            reason = f"{component} is not applicable to {adapter.architecture}"
        elif component not in plan.components:
            reason = f"{component} is not among {model}'s configured components"
        else:
            reason = f"{variant} holds none of {model}'s configured kinds on {component}"
        context.log.warning(f"{partition}: {reason}; nothing measured, stored rows left as they were")
        return MaterializeResult(
            metadata={"config_hash": config_hash, "rows": 0, "not_applicable": reason},
            check_results=[
                AssetCheckResult(
                    check_name="every_row_restored",
                    passed=True,
                    metadata={"rows": 0, "not_applicable": reason},
                )
            ],  # fmt: skip
        )

    # Global components (embedding, norm.final, lm_head) live outside the decoder layers: one point set each.
    layers = [None] if adapter.role_of(component) in GLOBAL_COMPONENTS else select_layers(plan.layers,
                                                                                            adapter.num_layers)
    specs = sweep_specs(plan, component, seed, layers, select_experts(plan.experts, adapter.n_experts))
    base = baseline_result(plan, plan.sweep_dataset)
    context.log.info(
        f"{partition}: {len(specs)} points = {len(layers)} layers x kinds {plan.kinds_of_variant(component, seed)} "
        f"on {plan.sweep_dataset} ({base.n_tokens} tokens, baseline token PPL {base.token_ppl:.3f})"
    )
    rows, windows = run_sweep(lm, base, specs, adapter=adapter, cache=prefix_cache(plan, plan.sweep_dataset),
                              log=lambda line: context.log.info(f"{partition}: {line}"),
                              rule=plan.adaptive.rule())  # fmt: skip
    rows = with_model(
        rows, model
    )  # keyed now, not only on write: the partition's chart labels panels by model
    rows.insert(rows.columns.get_loc("kind"), "variant", variant)
    if seed is None:  # the seed drew nothing: say so instead of storing the spec's placeholder seed
        rows["seed"] = pd.array([pd.NA] * len(rows), dtype="Int64")
        windows["seed"] = pd.array([pd.NA] * len(windows), dtype="Int64")

    unrestored = rows.loc[rows["restored"] != True]  # noqa: E712  (None/False both fail)
    if len(unrestored):
        forget_models()  # the cached weights can no longer be trusted as the unperturbed model
    # windows first: a reader who sees a sensitivity partition can rely on its windows being there
    step.write("sensitivity_windows", windows, partition)
    n_rows = step.write("sensitivity", rows, partition)

    worst = rows.loc[rows["delta_nll"].idxmax()] if rows["delta_nll"].notna().any() else None
    chart = layer_profile_markdown(rows)
    return MaterializeResult(
        metadata={
            "config_hash": config_hash,
            "rows": n_rows,
            "window_rows": len(windows),
            "process_model_loads": LOAD_COUNT["loads"],
            "layers": len(layers),
            "max_delta_nll": number(rows["delta_nll"].max()),
            "max_ppl_ratio": number(rows["ppl_ratio"].max()),
            "most_sensitive": (
                f"layer {worst['layer']} {worst['kind']} @ {worst['strength']}"
                if worst is not None
                else "n/a"
            ),
            "used_prefix_cache": bool(rows["used_prefix_cache"].all()) if len(rows) else False,
            "points_per_s": number(len(rows) / rows["elapsed_s"].sum()) if len(rows) else None,
            "chart": MetadataValue.md(chart),
            "preview": table_preview(
                rows.sort_values("delta_nll", ascending=False),
                ["kind", "layer", "strength", "delta_nll", "ppl_ratio", "kl", "changed_fraction", "restored"],
                limit=10,
            ),
        },  # fmt: skip
        check_results=[restored_check(rows)],
    )


def layer_profile_markdown(rows: pd.DataFrame) -> str:
    """The partition's layer profile as a PNG in markdown: Dagster has no Vega-Lite metadata type."""
    from esa_pipeline.core.reporting import charts

    finite = rows.loc[rows["delta_nll"].map(lambda v: v == v and abs(v) != float("inf"))]
    if finite.empty:
        return "No finite ΔNLL in this partition: every point was NaN/inf (see the `nonfinite` column)."
    return charts.png_markdown(charts.to_png(charts.layer_profile_chart(rows)))


def restored_check(rows: pd.DataFrame) -> AssetCheckResult:
    bad = rows.loc[rows["restored"] != True]  # noqa: E712
    return AssetCheckResult(
        check_name="every_row_restored",
        passed=bad.empty,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "rows": len(rows),
            "unrestored_rows": len(bad),
            "unrestored": table_preview(bad, ["kind", "layer", "strength", "seed", "restored"]),
        },
    )
