"""`esa materialize`: run a selection of the asset graph for the active experiment, partition by partition.

Partitioned runs target one partition each (the sweep has two dimensions), so a full profile is many runs;
they are recorded in the DAGSTER_HOME instance, so `make dev` shows their history afterwards. Stages run in
dependency order: per-model stage, sweeps, per-model analysis, cross-model assets. Upstream assets pulled in
by `with_upstream` run only where missing or computed under another configuration (their materialization
metadata carries `config_hash`); selected assets always run.

Executor: in-process by default here — each multiprocess step is a new Python process importing torch and
transformers (~10 s of CPU on a 2-core machine), which would dominate a smoke run of ~80 steps. Pass
`executor="multiprocess"` (or set ESA_EXECUTOR) to run every step in its own process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import (
    AssetKey,
    DagsterInstance,
    JobDefinition,
    MultiPartitionKey,
    execute_job,
    reconstructable,
)

from esa_pipeline.core.config import experiment_hash, load_experiment
from esa_pipeline.core.provenance import REPO_ROOT
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.automation import CROSS_MODEL_ASSETS, MODEL_ANALYSIS_ASSETS, MODEL_STAGE_ASSETS
from esa_pipeline.defs.partitions import sweep_key
from esa_pipeline.defs.planning import partition_plan, record_observations, register_partitions

STAGES: list[tuple[str, list[str]]] = [
    ("esa_model_stage", MODEL_STAGE_ASSETS),
    ("esa_sweep", ["sensitivity"]),
    ("esa_model_analysis", MODEL_ANALYSIS_ASSETS),
    ("esa_cross_model", CROSS_MODEL_ASSETS),
]
ALL_ASSETS = [name for _, names in STAGES for name in names]
UPSTREAM: dict[str, list[str]] = {
    "model_card": [],
    "baseline": ["model_card"],
    "weight_importance": ["baseline"],
    "moe_routing": ["baseline"],
    "sensitivity": ["baseline"],
    "significance": ["sensitivity"],
    "critical_layers": ["significance", "model_card"],
    "zero_shot_sensitivity": ["sensitivity", "baseline"],
    "architecture_comparison": ["sensitivity", "model_card"],
    "scaling_fit": ["sensitivity", "model_card"],
    "report": ["baseline", "significance", "critical_layers", "weight_importance", "moe_routing",
               "architecture_comparison", "scaling_fit", "zero_shot_sensitivity"],
}  # fmt: skip


@dataclass
class RunOutcome:
    job: str
    assets: list[str]
    partition: str | None
    success: bool
    seconds: float


@dataclass
class Summary:
    outcomes: list[RunOutcome] = field(default_factory=list)
    skipped_up_to_date: int = 0

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.success]


def upstream_closure(selected: list[str]) -> list[str]:
    unknown = sorted(set(selected) - set(ALL_ASSETS))
    if unknown:
        raise ValueError(f"unknown assets {unknown}: choose from {', '.join(ALL_ASSETS)}")
    out, todo = set(selected), list(selected)
    while todo:
        for parent in UPSTREAM[todo.pop()]:
            if parent not in out:
                out.add(parent)
                todo.append(parent)
    return [a for a in ALL_ASSETS if a in out]


def up_to_date(instance: DagsterInstance, asset: str, partition: str | None, config_hash: str) -> bool:
    event = instance.get_latest_materialization_event(AssetKey(asset)) if partition is None else None
    if partition is not None:
        from dagster import AssetRecordsFilter

        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
        ).records
        event = records[0].event_log_entry if records else None
    if event is None or event.asset_materialization is None:
        return False
    recorded = event.asset_materialization.metadata.get("config_hash")
    return recorded is not None and recorded.value == config_hash


def _job(name: str) -> JobDefinition:
    from esa_pipeline.definitions import defs

    return defs.resolve_job_def(name)


# Module-level factories so the multiprocess executor can rebuild each job in its step processes.
def model_stage_job() -> JobDefinition:
    return _job("esa_model_stage")


def sweep_job() -> JobDefinition:
    return _job("esa_sweep")


def model_analysis_job() -> JobDefinition:
    return _job("esa_model_analysis")


def cross_model_job() -> JobDefinition:
    return _job("esa_cross_model")


_FACTORIES = {
    "esa_model_stage": model_stage_job,
    "esa_sweep": sweep_job,
    "esa_model_analysis": model_analysis_job,
    "esa_cross_model": cross_model_job,
}


# Dagster's console logger prints every engine event at DEBUG; INFO keeps the per-layer progress lines.
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": os.environ.get("ESA_LOG_LEVEL", "INFO")}}}}


def owner_tags() -> dict[str, str]:
    """Which process runs a CLI run, so a later CLI can tell a dead run from a live one."""
    return {"esa/host": socket.gethostname(), "esa/pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_orphaned_runs(instance: DagsterInstance, log: Callable[[str], None] = print) -> int:
    """Fail the CLI runs on this host whose process died (killed, OOM) and free their pool slots.

    A run killed mid-step never releases its `gpu` pool slot; with a pool limit of 1 every later run would
    wait for it forever.
    """
    from dagster import DagsterRunStatus, RunsFilter

    in_progress = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
    records = instance.get_run_records(filters=RunsFilter(statuses=in_progress, tags={"esa/host": socket.gethostname()}))
    released = 0
    for record in records:
        run = record.dagster_run
        pid = int(run.tags.get("esa/pid", "0"))
        if pid <= 0 or _alive(pid):
            continue
        instance.report_run_failed(run, message=f"the process that ran it (pid {pid}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(f"released run {run.run_id[:8]} ({run.job_name}) left behind by dead process {pid}")
        released += 1
    return released


def run_partition(
    instance: DagsterInstance, job_name: str, assets: list[str], partition: str | MultiPartitionKey | None,
    executor: str,
) -> bool:  # fmt: skip
    keys = [AssetKey(a) for a in assets]
    job = _FACTORIES[job_name]()
    if executor == "in_process":
        result = job.execute_in_process(
            run_config=RUN_CONFIG, instance=instance, partition_key=None if partition is None else str(partition),
            asset_selection=keys, raise_on_error=False, tags=owner_tags(),
        )  # fmt: skip
        return result.success
    tags = owner_tags()
    if partition is not None:
        assert job.partitions_def is not None
        tags.update(job.partitions_def.get_tags_for_partition_key(str(partition)))
    with execute_job(reconstructable(_FACTORIES[job_name]), instance, run_config=RUN_CONFIG, tags=tags,
                     asset_selection=keys) as result:  # fmt: skip
        return result.success


def materialize(
    *,
    experiment: str | None = None,
    select: list[str] | None = None,
    with_upstream: bool = True,
    only_models: list[str] | None = None,
    executor: str | None = None,
    log: Callable[[str], None] = print,
) -> Summary:
    """Materialize `select` (default: everything) for the active experiment; returns what ran and how it went."""
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home"))
    if experiment:
        os.environ["ESA_EXPERIMENT"] = experiment  # step processes and resources resolve the same file
    executor = executor or os.environ.get("ESA_RUNNER_EXECUTOR") or "in_process"
    cfg = load_experiment(experiment)
    store = Store()
    targets = upstream_closure(select or ALL_ASSETS) if with_upstream else (select or ALL_ASSETS)
    explicit = set(select or ALL_ASSETS)
    models = [m for m in cfg.models if not only_models or m in only_models]
    missing_models = sorted(set(only_models or []) - set(cfg.models))
    if missing_models:
        raise ValueError(f"models {missing_models} are not in experiment {cfg.name!r}: {list(cfg.models)}")

    with DagsterInstance.get() as instance:
        release_orphaned_runs(instance, log)
        plans = [p for p in partition_plan(cfg, store) if p.model in models]
        register_partitions(plans, instance)
        record_observations(plans, instance)
        summary = Summary()
        for job_name, stage_assets in STAGES:
            assets = [a for a in stage_assets if a in targets]
            if not assets:
                continue
            for partition, config_hash in _partitions(job_name, plans, cfg):
                todo = [a for a in assets
                        if a in explicit or not up_to_date(instance, a, _partition_str(partition), config_hash)]  # fmt: skip
                summary.skipped_up_to_date += len(assets) - len(todo)
                if not todo:
                    continue
                started = time.perf_counter()
                ok = run_partition(instance, job_name, todo, partition, executor)
                outcome = RunOutcome(job_name, todo, _partition_str(partition), ok, time.perf_counter() - started)
                summary.outcomes.append(outcome)
                where = outcome.partition or "all models"
                log(f"[{'ok' if ok else 'FAILED'}] {', '.join(todo)} [{where}] {outcome.seconds:.1f}s")
        store.refresh_views()
    return summary


def _partition_str(partition: str | MultiPartitionKey | None) -> str | None:
    return None if partition is None else str(partition)


def _partitions(job_name: str, plans, cfg) -> list[tuple[str | MultiPartitionKey | None, str]]:
    if job_name == "esa_sweep":
        return [(sweep_key(p.model, v), p.section_hash) for p in plans for v in p.variants]
    if job_name == "esa_cross_model":
        return [(None, experiment_hash(cfg))]
    return [(p.model, p.section_hash) for p in plans]
