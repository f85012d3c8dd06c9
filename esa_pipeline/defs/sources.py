"""Observable sources: the experiment file, as data versions per model asset and per (model, variant).

Each per-model measuring asset follows its own source, whose version for a model is that asset's partition
hash (core.config.partition_hash: exactly the settings that change its rows). So editing importance settings
updates only `importance_config` and `eager()` re-runs only `weight_importance`; adding a seed adds `sweep_plan`
partitions and re-runs nothing that exists. `sweep_plan` is observed only for variants the model's architecture
has: the rest stay "missing", which `eager()` never requests. The experiment sensor records the same
observations automatically.
"""

from dagster import DataVersionsByPartition, SourceAsset, observable_source_asset

from esa_pipeline.defs.partitions import model_partitions, sweep_partitions
from esa_pipeline.defs.planning import MODEL_SOURCES, data_versions, partition_plan
from esa_pipeline.defs.resources import ExperimentResource, StoreResource


def _model_source(name: str, asset: str) -> SourceAsset:
    @observable_source_asset(
        name=name,
        partitions_def=model_partitions,
        group_name="config",
        description=f"The experiment YAML as seen by {asset}: data version per model = {asset}'s partition hash.",
    )
    def source(experiment: ExperimentResource, store: StoreResource) -> DataVersionsByPartition:
        models, _ = data_versions(partition_plan(experiment.load(), store.store()))
        return DataVersionsByPartition(models[name])

    return source


experiment_config, baseline_config, importance_config, routing_config = (
    _model_source(name, asset) for name, asset in MODEL_SOURCES.items()
)


@observable_source_asset(
    partitions_def=sweep_partitions,
    group_name="config",
    description="Which (model, component__seed) sweeps apply to each architecture (only those are observed); "
    "data version = the sweep partition's hash.",
)
def sweep_plan(experiment: ExperimentResource, store: StoreResource) -> DataVersionsByPartition:
    _, sweeps = data_versions(partition_plan(experiment.load(), store.store()))
    return DataVersionsByPartition(sweeps)
