"""Observable sources: the experiment file, as data versions per model and per (model, variant).

`experiment_config`'s version for a model is the hash of that model's resolved settings, so editing one
model's section updates exactly one partition and `eager()` downstream re-runs only that model. `sweep_plan`
is observed only for variants the model's architecture has: the rest stay "missing", which `eager()` never
requests. The experiment sensor records the same observations automatically.
"""


from dagster import DataVersionsByPartition, observable_source_asset

from esa_pipeline.defs.partitions import model_partitions, sweep_partitions
from esa_pipeline.defs.planning import data_versions, partition_plan
from esa_pipeline.defs.resources import ExperimentResource, StoreResource


@observable_source_asset(
    partitions_def=model_partitions,
    group_name="config",
    description="The experiment YAML; data version per model = hash of its section merged with global settings.",
)
def experiment_config(experiment: ExperimentResource, store: StoreResource) -> DataVersionsByPartition:
    models, _ = data_versions(partition_plan(experiment.load(), store.store()))
    return DataVersionsByPartition(models)


@observable_source_asset(
    partitions_def=sweep_partitions,
    group_name="config",
    description="Which (model, component__seed) sweeps apply to each architecture; only those are observed.",
)
def sweep_plan(experiment: ExperimentResource, store: StoreResource) -> DataVersionsByPartition:
    _, sweeps = data_versions(partition_plan(experiment.load(), store.store()))
    return DataVersionsByPartition(sweeps)
