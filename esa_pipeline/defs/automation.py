"""Jobs, sensors and schedules.

- `esa_experiment_sensor` (running by default): registers models/variants added to the YAML as dynamic
  partitions and records the sources' data versions when a model's section changes.
- `esa_automation` (running by default; dagster's built-in one starts stopped): evaluates the assets'
  `eager()` conditions, so a changed section re-runs exactly that model's partitions.
- `nightly_*_backfill` schedules (running by default; ESA_NIGHTLY_BACKFILL=off defines them stopped): fill gaps
  eager() never fills (partitions missing or computed under other settings): one run per model for the model
  stage, one run per contiguous range of a model's sweep partitions; run keys name the night and the partition
  hashes (idempotent per night).
"""


import json
import os
from collections.abc import Callable, Iterable

from dagster import (
    AddDynamicPartitionsRequest,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    MultiPartitionKey,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    schedule,
    sensor,
)

from esa_pipeline.core.provenance import stable_hash
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.partitions import (
    MODEL_DIMENSION,
    RANGE_END,
    RANGE_START,
    VARIANT_DIMENSION,
    contiguous_ranges,
    model_partitions,
    sweep_key,
    sweep_partitions,
)
from esa_pipeline.defs.planning import (
    ModelPartitionPlan,
    missing_partitions,
    observations,
    partition_plan,
    record_current_hashes,
    version_cursor,
)
from esa_pipeline.defs.resources import ExperimentResource, StoreResource

MODEL_STAGE_ASSETS = ["model_card", "baseline", "weight_importance", "moe_routing", "compression"]
MODEL_ANALYSIS_ASSETS = ["significance", "critical_layers", "zero_shot_sensitivity"]
CROSS_MODEL_ASSETS = ["architecture_comparison", "scaling_fit", "report"]

model_stage_job = define_asset_job(
    "esa_model_stage", selection=AssetSelection.assets(*MODEL_STAGE_ASSETS), partitions_def=model_partitions,
    description="Per model: card, baseline (+ zero-shot), weight importance, MoE routing.",
)  # fmt: skip
sweep_job = define_asset_job(
    "esa_sweep", selection=AssetSelection.assets("sensitivity"), partitions_def=sweep_partitions,
    description="One (model, component__seed) sensitivity sweep.",
)  # fmt: skip
model_analysis_job = define_asset_job(
    "esa_model_analysis", selection=AssetSelection.assets(*MODEL_ANALYSIS_ASSETS), partitions_def=model_partitions,
    description="Per model: significance, seed consistency, critical layers.",
)  # fmt: skip
cross_model_job = define_asset_job(
    "esa_cross_model", selection=AssetSelection.assets(*CROSS_MODEL_ASSETS),
    description="Architecture comparison, scaling fit and report over all models.",
)  # fmt: skip
JOBS = [model_stage_job, sweep_job, model_analysis_job, cross_model_job]


@sensor(
    name="esa_experiment_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers models/variants added to the experiment YAML and observes per-model config versions.",
)
def experiment_sensor(
    context: SensorEvaluationContext, experiment: ExperimentResource, store: StoreResource
) -> SensorResult:
    # An invalid YAML raises ConfigError here: the tick fails and shows the message naming the key and fix.
    cfg = experiment.load()
    plans = partition_plan(cfg, store.store())
    models, variants = missing_partitions(plans, context.instance)
    previous = json.loads(context.cursor) if context.cursor else {}
    requests = []
    if models:
        requests.append(AddDynamicPartitionsRequest(MODEL_DIMENSION, models))
    if variants:
        requests.append(AddDynamicPartitionsRequest(VARIANT_DIMENSION, variants))
    events = observations(plans, previous)
    if events:  # a changed version is a changed partition hash: SQL's `current_hashes` follows it
        record_current_hashes(plans, cfg.name, store.store())
    if models or variants or events:
        context.log.info(f"new models {models}, new variants {variants}, {len(events)} changed data versions")
    return SensorResult(
        dynamic_partitions_requests=requests, asset_events=events, cursor=json.dumps(version_cursor(plans))
    )


automation_sensor = AutomationConditionSensorDefinition(
    "esa_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates eager() on every asset: config edits re-run only the edited model's partitions.",
)


def stale(store: Store, relation: str, partition: str, config_hash: str) -> bool:
    """Missing, or computed under a different configuration than the current one."""
    if not store.has(relation, partition):
        return True
    hashes = store.read(relation, partition)["config_hash"].unique()
    return list(hashes) != [config_hash]


def backfill_requests(
    context: ScheduleEvaluationContext, experiment: ExperimentResource, store: StoreResource, relation: str,
    partitions: Callable[[ModelPartitionPlan], Iterable[tuple[str | MultiPartitionKey, str]]],
) -> list[RunRequest]:
    """One run per partition whose `relation` rows are missing or stale (another partition hash); the run key
    names the night and the partition hash, so a re-evaluated tick never launches the same backfill twice."""
    st = store.store()
    night = context.scheduled_execution_time.date().isoformat()
    return [
        RunRequest(run_key=f"{night}:{key}:{h}", partition_key=key)
        for p in partition_plan(experiment.load(), st)
        for key, h in partitions(p)
        if stale(st, relation, str(key), h)
    ]  # fmt: skip


def sweep_backfill_requests(
    context: ScheduleEvaluationContext, experiment: ExperimentResource, store: StoreResource
) -> list[RunRequest]:
    """Per model, one run per contiguous range of its missing or stale sweep partitions: the run loads the
    model and builds its baseline and prefix cache once (BackfillPolicy.multi_run), then measures each."""
    st = store.store()
    night = context.scheduled_execution_time.date().isoformat()
    order = context.instance.get_dynamic_partitions(VARIANT_DIMENSION)
    requests = []
    for p in partition_plan(experiment.load(), st):
        todo = [v for v, h in p.variant_hashes.items() if stale(st, "sensitivity", str(sweep_key(p.model, v)), h)]
        for first, last in contiguous_ranges(todo, order):
            span = order[order.index(first): order.index(last) + 1]
            versions = stable_hash([p.variant_hashes[v] for v in span])
            start, end = str(sweep_key(p.model, first)), str(sweep_key(p.model, last))
            requests.append(RunRequest(run_key=f"{night}:{start}...{end}:{versions}",
                                       tags={RANGE_START: start, RANGE_END: end}))  # fmt: skip
    return requests


# Nightly backfills fill the gaps eager() never fills (partitions missing since before a model was added, or a
# run that died). They run by default (the daemon of `make dev` / a deployment ticks them); set
# ESA_NIGHTLY_BACKFILL=off before starting Dagster to define them stopped (they can still be started in the UI).
NIGHTLY_ENV = "ESA_NIGHTLY_BACKFILL"


def nightly_status() -> DefaultScheduleStatus:
    value = os.environ.get(NIGHTLY_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{NIGHTLY_ENV}={value!r}: use on (the default) or off")
    return DefaultScheduleStatus.RUNNING if value == "on" else DefaultScheduleStatus.STOPPED


def nightly_schedules() -> list[ScheduleDefinition]:
    """The two nightly backfill schedules, running unless ESA_NIGHTLY_BACKFILL=off."""
    status = nightly_status()

    @schedule(cron_schedule="0 2 * * *", job=model_stage_job, default_status=status,
              description="Nightly: one run per model whose baseline is missing or stale.")  # fmt: skip
    def nightly_model_backfill(
        context: ScheduleEvaluationContext, experiment: ExperimentResource, store: StoreResource
    ) -> list[RunRequest]:
        return backfill_requests(context, experiment, store, "baselines",
                                 lambda p: [(p.model, p.hashes["baseline"])])  # fmt: skip

    @schedule(cron_schedule="0 3 * * *", job=sweep_job, default_status=status,
              description="Nightly: per model, one run per contiguous range of missing or stale sweep partitions.")  # fmt: skip
    def nightly_sweep_backfill(
        context: ScheduleEvaluationContext, experiment: ExperimentResource, store: StoreResource
    ) -> list[RunRequest]:
        return sweep_backfill_requests(context, experiment, store)

    return [nightly_model_backfill, nightly_sweep_backfill]


SENSORS = [experiment_sensor, automation_sensor]
