"""Helpers shared by the asset modules: the GPU pool and k8s tags, eager automation, storing rows."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from dagster import AssetSelection, AutomationCondition, MetadataValue

from esa_pipeline.core.storage import Store, with_provenance

GPU_POOL = "gpu"
# Read by dagster_k8s.k8s_job_executor (ignored by the local executors): one GPU per model-heavy step.
GPU_OP_TAGS: dict[str, Any] = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}}
    }
}
EAGER = AutomationCondition.eager()


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
