"""Partitions: `model` (dynamic) and `variant` = `<component>__<seed>` (dynamic), crossed for the sweep.

Both dimensions are dynamic so that the experiment sensor can register models and variants added to the YAML
without a code reload (DESIGN §7: MultiPartitions allow two dimensions, so kind/layer/strength live inside a
partition). The cross product contains variants an architecture lacks (`ffn.gate` on Pythia): the `sweep_plan`
source only observes applicable (model, variant) pairs, so `eager()` — which waits for missing parents — never
requests the others, and a manual run of one records it explicitly as not applicable.
"""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, MultiPartitionKey, MultiPartitionsDefinition

MODEL_DIMENSION = "model"
VARIANT_DIMENSION = "variant"

# Run tags of a run over a range of partitions (a multi-partition run, see BackfillPolicy.multi_run).
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"

model_partitions = DynamicPartitionsDefinition(name=MODEL_DIMENSION)
variant_partitions = DynamicPartitionsDefinition(name=VARIANT_DIMENSION)
sweep_partitions = MultiPartitionsDefinition(
    {MODEL_DIMENSION: model_partitions, VARIANT_DIMENSION: variant_partitions}
)


def sweep_key(model: str, variant: str) -> MultiPartitionKey:
    return MultiPartitionKey({MODEL_DIMENSION: model, VARIANT_DIMENSION: variant})


def split_sweep_key(partition_key: str | MultiPartitionKey) -> tuple[str, str]:
    """(model, variant) of a sweep partition key ("model|variant" in dimension-name order)."""
    if isinstance(partition_key, MultiPartitionKey):
        dims = partition_key.keys_by_dimension
        return dims[MODEL_DIMENSION], dims[VARIANT_DIMENSION]
    model, _, variant = str(partition_key).partition("|")
    return model, variant


def contiguous_ranges(todo: list[str], order: list[str]) -> list[tuple[str, str]]:
    """(first, last) runs of `todo` that are contiguous in the variant dimension's `order` (a run's range
    covers every key between its ends, so a variant not to compute splits it)."""
    wanted, ranges = set(todo), []
    current: list[str] = []
    for variant in order:
        if variant in wanted:
            current.append(variant)
        elif current:
            ranges.append((current[0], current[-1]))
            current = []
    if current:
        ranges.append((current[0], current[-1]))
    return ranges
