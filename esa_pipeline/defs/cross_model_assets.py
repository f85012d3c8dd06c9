"""Cross-model assets: architecture comparison, scaling fit and the report, over every model of the experiment."""


import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from esa_pipeline.core.config import ExperimentConfig, experiment_hash
from esa_pipeline.core.storage import UNPARTITIONED, Store
from esa_pipeline.defs.analysis_assets import critical_layers, moe_routing, significance, weight_importance
from esa_pipeline.defs.common import (
    EAGER_ACROSS_MODELS,
    current_model_rows,
    number,
    store_rows,
    table_preview,
)
from esa_pipeline.defs.compression_assets import compression
from esa_pipeline.defs.model_assets import baseline, model_card
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sweep_assets import sensitivity
from esa_pipeline.defs.zero_shot_assets import zero_shot_sensitivity

CROSS_MODEL_RELATIONS = {"architecture_comparison", "group_comparison", "scaling_fit"}


def experiment_rows(store: Store, relation: str, cfg: ExperimentConfig) -> pd.DataFrame:
    """Rows of every model in the experiment, each under its current settings (older configs left out).

    Each model's own partition files only: files of models outside the experiment are never opened."""
    if not store.has(relation):
        raise FileNotFoundError(f"no {relation} rows stored yet: materialize {relation} first")
    frames = []
    for model in cfg.models:
        rows = current_model_rows(store, cfg, model, relation)
        if not rows.empty:
            frames.append(rows)
    if not frames:
        raise FileNotFoundError(f"no {relation} rows for the models of {cfg.name!r} under their current settings")
    return pd.concat(frames, ignore_index=True)


@asset(
    deps=[sensitivity, model_card],
    group_name="cross_model",
    automation_condition=EAGER_ACROSS_MODELS,
    description="Layer profiles of all models on normalized depth, component ranks; dense vs MoE and instruct vs "
    "base contrasts (group_comparison).",
)
def architecture_comparison(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.analysis import architecture_comparison as compare
    from esa_pipeline.core.analysis import dense_vs_moe, instruct_vs_base

    cfg = experiment.load()
    st = store.store()
    sens, cards = experiment_rows(st, "sensitivity", cfg), experiment_rows(st, "models", cfg)
    rows = compare(sens, cards)
    groups = pd.concat([dense_vs_moe(rows, cards), instruct_vs_base(rows, cards)], ignore_index=True)
    n_rows = store_rows(st, "architecture_comparison", UNPARTITIONED, rows, experiment_hash(cfg))
    n_groups = store_rows(st, "group_comparison", UNPARTITIONED, groups, experiment_hash(cfg))
    overall = groups.loc[groups["component"] == "all"]
    ranks = rows.groupby(["model", "component"], dropna=False)["component_rank"].min().reset_index()
    return MaterializeResult(
        metadata={
            "config_hash": experiment_hash(cfg),
            "rows": n_rows,
            "models": ", ".join(sorted(rows["model"].unique())),
            "group_comparison_rows": n_groups,
            "groups_overall": table_preview(overall, ["comparison", "kind", "strength", "models_a", "models_b",
                                                      "difference", "welch_p", "warnings"]),
            "component_ranks": table_preview(ranks.sort_values(["model", "component_rank"]),
                                             ["model", "component", "component_rank"], limit=60),
        }  # fmt: skip
    )


@asset(
    deps=[sensitivity, model_card],
    group_name="cross_model",
    automation_condition=EAGER_ACROSS_MODELS,
    check_specs=[AssetCheckSpec("scaling_fit_quality", asset="scaling_fit",
                                description="Enough models for a fit, and R² above what p < 0.05 needs")],
    description="Log-log fit of sensitivity vs parameter count (total and active), exponent CI, R² vs required.",
)  # fmt: skip
def scaling_fit(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.analysis import scaling_fit as fit

    cfg = experiment.load()
    st = store.store()
    rows = fit(experiment_rows(st, "sensitivity", cfg), experiment_rows(st, "models", cfg))
    n_rows = store_rows(st, "scaling_fit", UNPARTITIONED, rows, experiment_hash(cfg))
    fitted = rows.loc[rows["exponent"].notna()]
    convincing = fitted.loc[fitted["r2"] >= fitted["r2_required_p05"]]
    return MaterializeResult(
        metadata={
            "config_hash": experiment_hash(cfg),
            "rows": n_rows,
            "fitted_cells": len(fitted),
            "cells_meeting_r2_p05": len(convincing),
            "median_exponent": number(fitted["exponent"].median()) if len(fitted) else None,
            "fits": table_preview(rows, ["kind", "component", "strength", "param_basis", "n_models", "exponent",
                                         "r2", "r2_required_p05", "warnings"]),
        },  # fmt: skip
        check_results=[
            AssetCheckResult(
                check_name="scaling_fit_quality",
                passed=len(fitted) > 0 and len(convincing) == len(fitted),
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "fitted_cells": len(fitted),
                    "cells_below_required_r2": len(fitted) - len(convincing),
                    "max_models_per_fit": int(rows["n_models"].max()) if len(rows) else 0,
                },
            )
        ],
    )


@asset(
    deps=[baseline, significance, critical_layers, weight_importance, moe_routing, architecture_comparison,
          scaling_fit, zero_shot_sensitivity, compression],
    group_name="report",
    automation_condition=EAGER_ACROSS_MODELS,
    description="Charts (PNG/HTML/JSON) and a self-contained HTML report under data/reports/.",
)  # fmt: skip
def report(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.reporting.report import REPORT_RELATIONS, build_report

    cfg = experiment.load()
    st = store.store()
    tables, missing = {}, []
    for relation in REPORT_RELATIONS:
        try:
            tables[relation] = (experiment_rows(st, relation, cfg) if relation not in CROSS_MODEL_RELATIONS
                                else st.read(relation, UNPARTITIONED, config_hash=experiment_hash(cfg)))  # fmt: skip
        except FileNotFoundError:
            missing.append(relation)  # the report says which sections have no data
    out_dir = st.root.parent / "reports" / cfg.name
    index = build_report(tables, out_dir, experiment=cfg.model_dump(mode="json"))
    context.log.info(f"report written to {index}")
    return MaterializeResult(
        metadata={
            "config_hash": experiment_hash(cfg),
            "path": MetadataValue.path(str(index)),
            "charts": len(list(out_dir.glob("*.png"))),
            "relations_without_rows": ", ".join(missing) or "none",
        }
    )
