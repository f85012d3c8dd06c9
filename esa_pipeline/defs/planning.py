"""What the active experiment asks for: model partitions, applicable variants and their data versions.

Shared by the observable sources (manual "Observe"), the experiment sensor (automatic), the nightly schedules
and `esa materialize`, so all of them agree on which partitions exist and when one is stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from dagster import AssetKey, AssetObservation, DagsterInstance

from esa_pipeline.core.config import (
    HASHED_ASSETS,
    ExperimentConfig,
    components_for_architecture,
    describe_source,
    model_plan,
    model_section_hash,
    partition_hash,
)
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.partitions import MODEL_DIMENSION, VARIANT_DIMENSION, sweep_key

# dagster's tag for a data version (what DataVersion/DataVersionsByPartition write on an observation).
DATA_VERSION_TAG = "dagster/data_version"
SWEEP_PLAN_KEY = AssetKey("sweep_plan")
# Model-partitioned observable sources -> the asset each one versions (its data version = that partition hash).
MODEL_SOURCES = {
    "experiment_config": "model_card",
    "baseline_config": "baseline",
    "importance_config": "weight_importance",
    "routing_config": "moe_routing",
}


@dataclass(frozen=True)
class ModelPartitionPlan:
    model: str
    section_hash: str  # the whole resolved section (shown by `esa validate`; partitions use partition hashes)
    architecture: str | None
    variants: list[str]  # applicable ones only
    not_applicable: list[str]  # configured components the architecture lacks (recorded, never requested)
    hashes: dict[str, str]  # per-model asset -> its partition hash (core.config.partition_hash)
    variant_hashes: dict[str, str]  # applicable variant -> its sensitivity partition hash


def architecture_of(cfg: ExperimentConfig, model: str, store: Store | None = None) -> str | None:
    """HF class name without loading weights; falls back to a stored model card (hub models not cached)."""
    plan = model_plan(cfg, model)
    facts = describe_source(plan.source, plan.revision)
    if facts and facts[0]:
        return facts[0]
    if store is not None and store.has("models", model):
        cards = store.read("models", model)
        if "architecture" in cards.columns and len(cards):
            return str(cards["architecture"].iloc[0])
    return None


def partition_plan(cfg: ExperimentConfig, store: Store | None = None) -> list[ModelPartitionPlan]:
    out = []
    for model in cfg.models:
        plan = model_plan(cfg, model)
        architecture = architecture_of(cfg, model, store)
        available = components_for_architecture(architecture, plan.adapter) if architecture else None
        missing = [c for c in plan.components if available is not None and c not in available]
        variants = plan.variants(available)
        out.append(
            ModelPartitionPlan(
                model=model,
                section_hash=model_section_hash(cfg, model),
                architecture=architecture,
                variants=variants,
                not_applicable=missing,
                hashes={a: partition_hash(cfg, model, a) for a in HASHED_ASSETS if a != "sensitivity"},
                variant_hashes={v: partition_hash(cfg, model, "sensitivity", v) for v in variants},
            )
        )
    return out


def data_versions(plans: list[ModelPartitionPlan]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({source: {model: version}}, {"model|variant": version}) — the observable sources' data versions.

    A sweep partition's version is its partition hash: adding a seed adds versions, editing one component's
    strengths changes only that component's, editing importance settings changes none.
    """
    models = {source: {p.model: p.hashes[asset] for p in plans} for source, asset in MODEL_SOURCES.items()}
    sweeps = {str(sweep_key(p.model, v)): h for p in plans for v, h in p.variant_hashes.items()}
    return models, sweeps


def observations(plans: list[ModelPartitionPlan], previous: dict[str, str] | None = None) -> list[AssetObservation]:
    """Observations of both sources for every partition whose version differs from `previous`."""
    previous = previous or {}
    models, sweeps = data_versions(plans)
    events = []
    for key, versions in ((SWEEP_PLAN_KEY, sweeps), *((AssetKey(s), v) for s, v in models.items())):
        for partition, version in versions.items():
            if previous.get(f"{key.to_user_string()}:{partition}") != version:
                events.append(AssetObservation(key, partition=partition, tags={DATA_VERSION_TAG: version}))
    return events


def version_cursor(plans: list[ModelPartitionPlan]) -> dict[str, str]:
    models, sweeps = data_versions(plans)
    return {
        **{f"{source}:{k}": v for source, versions in models.items() for k, v in versions.items()},
        **{f"{SWEEP_PLAN_KEY.to_user_string()}:{k}": v for k, v in sweeps.items()},
    }


def missing_partitions(plans: list[ModelPartitionPlan], instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(models, variants) the experiment needs that the instance has not registered yet."""
    known_models = set(instance.get_dynamic_partitions(MODEL_DIMENSION))
    known_variants = set(instance.get_dynamic_partitions(VARIANT_DIMENSION))
    models = [p.model for p in plans if p.model not in known_models]
    variants = sorted({v for p in plans for v in p.variants} - known_variants)
    return models, variants


def register_partitions(plans: list[ModelPartitionPlan], instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """Add missing model/variant partitions to the instance (what the experiment sensor does each tick)."""
    models, variants = missing_partitions(plans, instance)
    if models:
        instance.add_dynamic_partitions(MODEL_DIMENSION, models)
    if variants:
        instance.add_dynamic_partitions(VARIANT_DIMENSION, variants)
    return models, variants


def record_observations(plans: list[ModelPartitionPlan], instance: DagsterInstance) -> int:
    """Write the sources' current data versions to the instance (idempotent: same version = no update)."""
    events = observations(plans)
    for event in events:
        instance.report_runless_asset_event(event)
    return len(events)


def current_hashes_frame(plans: list[ModelPartitionPlan], experiment: str) -> pd.DataFrame:
    """One row per partition the experiment asks for: (model, asset, partition_key, config_hash). Rows of a
    relation whose config_hash is in here are current; others are from older settings."""
    rows = [
        {"experiment": experiment, "model": p.model, "asset": asset, "partition_key": p.model, "config_hash": h}
        for p in plans for asset, h in p.hashes.items()
    ] + [
        {"experiment": experiment, "model": p.model, "asset": "sensitivity", "partition_key": str(sweep_key(p.model, v)),
         "config_hash": h}
        for p in plans for v, h in p.variant_hashes.items()
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["experiment", "model", "asset", "partition_key", "config_hash"])


def record_current_hashes(plans: list[ModelPartitionPlan], experiment: str, store: Store) -> None:
    """Store `current_hashes` (one file per experiment) so SQL can keep only current rows."""
    store.write("current_hashes", experiment, current_hashes_frame(plans, experiment))
