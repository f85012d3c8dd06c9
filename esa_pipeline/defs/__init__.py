"""Thin dagster wiring around esa_pipeline.core: assets, checks, sensors, schedules, executors, resources."""

from __future__ import annotations

from dagster import Definitions

from esa_pipeline.defs.analysis_assets import critical_layers, moe_routing, significance, weight_importance
from esa_pipeline.defs.automation import JOBS, SENSORS, nightly_schedules
from esa_pipeline.defs.compression_assets import compression
from esa_pipeline.defs.cross_model_assets import architecture_comparison, report, scaling_fit
from esa_pipeline.defs.executors import executor_from_env
from esa_pipeline.defs.model_assets import baseline, model_card
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sources import (
    baseline_config,
    experiment_config,
    importance_config,
    routing_config,
    sweep_plan,
)
from esa_pipeline.defs.sweep_assets import sensitivity
from esa_pipeline.defs.zero_shot_assets import zero_shot_sensitivity

ASSETS = [
    experiment_config,
    baseline_config,
    importance_config,
    routing_config,
    sweep_plan,
    model_card,
    baseline,
    sensitivity,
    significance,
    critical_layers,
    zero_shot_sensitivity,
    weight_importance,
    moe_routing,
    architecture_comparison,
    scaling_fit,
    compression,
    report,
]


def build_definitions(
    *,
    store_root: str | None = None,
    db_path: str | None = None,
    experiment: str | None = None,
    executor: str | None = None,
) -> Definitions:
    """The code location. Arguments override the environment (ESA_STORE_DIR, ESA_EXPERIMENT, ESA_EXECUTOR)."""
    return Definitions(
        assets=ASSETS,
        jobs=JOBS,
        sensors=SENSORS,
        schedules=nightly_schedules(),
        executor=executor_from_env(executor),
        resources={
            "store": StoreResource(root=store_root, db_path=db_path),
            "experiment": ExperimentResource(path=experiment),
        },
    )
