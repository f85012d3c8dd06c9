"""Helpers shared by the asset modules: the GPU pool and k8s tags, eager automation, a model step's
settings, storing rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from dagster import AssetSelection, AutomationCondition, MetadataValue

from esa_pipeline.core.config import (
    ExperimentConfig,
    ModelPlan,
    asset_of_relation,
    current_hashes,
    model_plan,
    partition_hash,
)
from esa_pipeline.core.storage import Store, with_provenance
from esa_pipeline.defs.partitions import model_partitions

if TYPE_CHECKING:
    from esa_pipeline.core.models.adapters.base import Adapter
    from esa_pipeline.core.models.registry import LoadedModel
    from esa_pipeline.defs.resources import ExperimentResource, StoreResource

GPU_POOL = "gpu"
# Read by dagster_k8s.k8s_job_executor (ignored by the local executors): one GPU per model-heavy step.
GPU_OP_TAGS: dict[str, Any] = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
        }
    }
}
EAGER = AutomationCondition.eager()
# A model whose blocking baseline check failed (an implausible baseline makes every ratio meaningless) gets no
# automatic downstream runs: Dagster's own blocking-check condition (the check is partitioned by model).
BLOCKING_CHECKS_PASSED = AutomationCondition.all_deps_blocking_checks_passed()


def eager_on_own_version(*ignored: str) -> AutomationCondition:
    """eager(), but an update of the `ignored` parents alone does not re-run the asset: it follows its own
    config source (whose version is its partition hash) and the parents only order the work. A re-run
    baseline (say after a zero_shot edit) reproduces the same numbers, so the sweeps need not follow it."""
    updated = AutomationCondition.any_deps_updated().ignore(AssetSelection.assets(*ignored))
    return (EAGER.replace("any_deps_updated", updated) & BLOCKING_CHECKS_PASSED).with_label(
        f"eager on own version (not on {', '.join(ignored)} updates), blocking checks passed"
    )


# Decorator arguments of a step that loads a model: one GPU each, queued in the `gpu` pool.
ON_GPU: dict[str, Any] = {"pool": GPU_POOL, "op_tags": GPU_OP_TAGS}
# ... and of such a step run once per model partition (automation condition given per asset).
PER_MODEL_ON_GPU: dict[str, Any] = {"partitions_def": model_partitions, **ON_GPU}


@dataclass(frozen=True)
class ModelStep:
    """What every per-model step starts from: the model's settings under the active experiment file."""

    model: str
    plan: ModelPlan
    config_hash: str  # the partition hash of this asset (core.config.HASHED_ASSETS), stored on every row
    store: Store
    cfg: ExperimentConfig

    def load(self) -> tuple[LoadedModel, Adapter]:
        """The model (cached per process) and its architecture adapter."""
        from esa_pipeline.core.models.adapters import adapter_for
        from esa_pipeline.defs.loaded import loaded_model

        lm = loaded_model(self.plan)
        return lm, adapter_for(lm.model, self.plan.adapter)

    def write(self, relation: str, df: pd.DataFrame, partition: str | None = None) -> int:
        """Store `df` as the (default: this model's) partition of `relation`, keyed by the model name."""
        return store_rows(
            self.store, relation, partition or self.model, with_model(df, self.model), self.config_hash
        )

    def current(self, relation: str) -> pd.DataFrame:
        """This model's stored rows of `relation` computed under the current settings of their partitions."""
        return current_model_rows(self.store, self.cfg, self.model, relation)


def model_step(model: str, experiment: ExperimentResource, store: StoreResource, asset: str,
               variant: str | None = None) -> ModelStep:  # fmt: skip
    """The step of `asset` for one model (and one sweep variant): its plan and its partition hash."""
    cfg = experiment.load()
    return ModelStep(
        model, model_plan(cfg, model), partition_hash(cfg, model, asset, variant), store.store(), cfg
    )


def current_model_rows(store: Store, cfg: ExperimentConfig, model: str, relation: str) -> pd.DataFrame:
    """`model`'s rows of `relation` whose partition hash is current (stale partitions of older settings and
    partitions no longer configured are left out). Empty when none are stored."""
    asset = asset_of_relation(relation)
    if asset is None:
        raise KeyError(f"{relation} is not written by a per-model asset (core.config.ASSET_RELATIONS)")
    # Only this model's own partition files are read: a damaged file of another model cannot fail this one.
    own = store.model_partitions(relation, model) if store.has(relation) else []
    if not own:
        return pd.DataFrame()
    rows = store.read(relation, partitions=own, model=model)
    return rows.loc[rows["config_hash"].isin(current_hashes(cfg, model, asset))].reset_index(drop=True)


def store_rows(store: Store, relation: str, partition: str, df: pd.DataFrame, config_hash: str) -> int:
    """Write `df` (with provenance columns) as the partition's single atomic file; returns the row count."""
    return store.write(relation, partition, with_provenance(df, config_hash)).rows


def with_model(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows keyed by the experiment's model name (the partition), whatever name the loader reported."""
    out = df.copy()
    if "model" in out.columns:
        out["model"] = model
    else:
        out.insert(0, "model", model)
    return out


def number(value: Any) -> float | None:
    """A finite float for metadata, None for NaN/inf/missing (dagster metadata cannot hold NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def table_preview(df: pd.DataFrame, columns: list[str], limit: int = 20) -> MetadataValue:
    shown = [c for c in columns if c in df.columns]
    return MetadataValue.md(df[shown].head(limit).to_markdown(index=False) if len(df) else "(no rows)")


# Downstream of the sweep, a (model, variant) pair the architecture lacks is never materialized and so stays
# "missing" forever; plain eager() would then never run the model's analysis. Missing sweep partitions are
# therefore not blocking here (in-progress ones still are: the analysis waits for the running sweep).
EAGER_AFTER_SWEEP = EAGER.replace(
    "any_deps_missing",
    AutomationCondition.any_deps_missing().ignore(AssetSelection.assets("sensitivity")),
)
# Cross-model assets read every model's rows; a model registered earlier and since removed from the YAML
# would stay missing, so they do not wait for missing parents at all (they summarise what is stored).
EAGER_ACROSS_MODELS = (
    (AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated()).since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("eager (across models)")
