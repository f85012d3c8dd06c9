"""`esa materialize`: run a selection of the asset graph for the active experiment, resuming where it stopped.

Stages run in dependency order: per-model stage, sweeps, per-model analysis, cross-model assets; runs are
recorded in the DAGSTER_HOME instance, so `make dev` shows their history afterwards. A (asset, partition) is
computed only when it is missing or stale: its stored rows carry another partition hash than the current one
(core.config.partition_hash: exactly the settings that change its rows), or an upstream asset of the same model
ran in this invocation. Everything else is skipped and counted, with the reason; `force=True` recomputes. So a
run killed mid-sweep resumes with exactly the partitions it had not stored yet.

A model's sweep partitions run as few multi-partition runs (contiguous ranges of the variant dimension, the
asset's `BackfillPolicy.multi_run`): the model is loaded and its baseline and prefix cache built once per run.
A model whose model stage failed, or whose baseline fails the blocking `baseline_sanity` check, gets no
downstream runs; the root cause is reported once.

Executor: in-process by default here — each multiprocess step is a new Python process importing torch and
transformers (~10 s of CPU on a 2-core machine), which would dominate a smoke run of ~80 steps. Pass
`executor="multiprocess"` (or set ESA_EXECUTOR) to run every step in its own process.
"""

from __future__ import annotations

import difflib
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

from esa_pipeline.core.config import (
    ASSET_RELATIONS,
    ConfigError,
    ExperimentConfig,
    experiment_hash,
    load_experiment,
    not_configured,
    partition_hash,
)
from esa_pipeline.core.provenance import REPO_ROOT
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.automation import CROSS_MODEL_ASSETS, MODEL_ANALYSIS_ASSETS, MODEL_STAGE_ASSETS
from esa_pipeline.defs.common import current_model_rows
from esa_pipeline.defs.loaded import LOAD_COUNT
from esa_pipeline.defs.partitions import (
    RANGE_END,
    RANGE_START,
    VARIANT_DIMENSION,
    contiguous_ranges,
    sweep_key,
)
from esa_pipeline.defs.planning import (
    partition_plan,
    record_current_hashes,
    record_observations,
    register_partitions,
)

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
    "compression": ["baseline"],
    "sensitivity": ["baseline"],
    "significance": ["sensitivity"],
    "critical_layers": ["significance", "model_card"],
    "zero_shot_sensitivity": ["sensitivity", "baseline"],
    "architecture_comparison": ["sensitivity", "model_card"],
    "scaling_fit": ["sensitivity", "model_card"],
    "report": ["baseline", "significance", "critical_layers", "weight_importance", "moe_routing",
               "architecture_comparison", "scaling_fit", "zero_shot_sensitivity", "compression"],
}  # fmt: skip


@dataclass
class RunOutcome:
    job: str
    assets: list[str]
    partition: str | None  # one partition, a range "first...last", or None (unpartitioned)
    success: bool
    seconds: float
    error: str | None = None  # the first step failure's message (the root cause)


@dataclass
class Summary:
    outcomes: list[RunOutcome] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> (asset, partition) pairs skipped
    blocked: dict[str, str] = field(default_factory=dict)  # model -> why its downstream assets did not run
    model_loads: int = 0  # models loaded by this process (in-process executor)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def skipped_up_to_date(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def check_asset_names(selected: list[str]) -> None:
    """Raises ConfigError (the CLI prints it, exit 2) naming assets that do not exist, with a close match."""
    unknown = [name for name in dict.fromkeys(selected) if name not in ALL_ASSETS]
    if unknown:
        guesses = {name: difflib.get_close_matches(name, ALL_ASSETS, n=1) for name in unknown}
        hints = "; ".join(f"{name!r}: did you mean {g[0]!r}?" for name, g in guesses.items() if g)
        raise ConfigError(f"unknown assets {unknown}{f' ({hints})' if hints else ''}; choose from "
                          f"{', '.join(ALL_ASSETS)}")  # fmt: skip


def upstream_closure(selected: list[str]) -> list[str]:
    check_asset_names(selected)
    out, todo = set(selected), list(selected)
    while todo:
        for parent in UPSTREAM[todo.pop()]:
            if parent not in out:
                out.add(parent)
                todo.append(parent)
    return [a for a in ALL_ASSETS if a in out]


def stored_current(store: Store, relation: str, partition: str, config_hash: str) -> bool:
    """The partition's rows are stored and every one carries the current partition hash."""
    if not store.has(relation, partition):
        return False
    hashes = store.read(relation, partition)["config_hash"].unique()
    return list(hashes) == [config_hash]


def recorded_hash(
    instance: DagsterInstance, asset: str, partition: str | None
) -> tuple[str | None, int | None]:
    """(config_hash, rows) from the metadata of the latest materialization of one partition."""
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(
            asset_key=AssetKey(asset), asset_partitions=None if partition is None else [partition]
        ),
        limit=1,
    ).records
    event = records[0].event_log_entry.asset_materialization if records else None
    if event is None:
        return None, None
    value = lambda key: getattr(event.metadata.get(key), "value", None)  # noqa: E731
    return value("config_hash"), value("rows")


def up_to_date(
    instance: DagsterInstance, store: Store, asset: str, partition: str | None, config_hash: str
) -> bool:
    """Is (asset, partition) computed under the current settings?

    Sweep partitions: their stored rows say so (a multi-partition run records its materializations only at
    its end, but every partition's rows are stored as soon as they are measured). Other assets: the latest
    materialization recorded this hash, and (when it stored rows) its primary relation carries it too.
    """
    if asset == "sensitivity":
        return partition is not None and stored_current(store, "sensitivity", partition, config_hash)
    recorded, rows = recorded_hash(instance, asset, partition)
    if recorded != config_hash:
        return False
    relations = ASSET_RELATIONS.get(asset)
    if not relations or not rows or partition is None:
        return True
    return stored_current(store, relations[0], partition, config_hash)


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
    records = instance.get_run_records(
        filters=RunsFilter(statuses=in_progress, tags={"esa/host": socket.gethostname()})
    )
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


def root_cause(result) -> str | None:
    """The first failed step's innermost error, on one line (`ModelUnavailable: ... Fix: ...`)."""
    failures = result.get_step_failure_events()
    if not failures:
        return None
    # Dagster wraps the user's exception (DagsterExecutionStepExecutionError ...): report the first error that
    # is not Dagster's own, whose message names the fix (e.g. ModelUnavailable), not its low-level cause.
    error = failures[0].step_failure_data.error
    while error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    if error is None:
        return f"step {failures[0].step_key} failed"
    qualified, sep, text = error.message.partition(": ")
    if sep and error.cls_name and qualified.endswith(error.cls_name):  # "pkg.module.Cls: text" -> "Cls: text"
        return f"{error.cls_name}: {' '.join(text.split())}"
    return " ".join(error.message.split())


def run_partition(
    instance: DagsterInstance, job_name: str, assets: list[str], partition: str | MultiPartitionKey | None,
    executor: str, last: str | MultiPartitionKey | None = None,
) -> tuple[bool, str | None]:  # fmt: skip
    """Run `assets` for one partition, or for the range partition..last (one run); (success, root cause)."""
    keys = [AssetKey(a) for a in assets]
    job = _FACTORIES[job_name]()
    tags = owner_tags()
    if last is not None and str(last) != str(partition):
        tags.update({RANGE_START: str(partition), RANGE_END: str(last)})
        partition = None
    if executor == "in_process":
        result = job.execute_in_process(
            run_config=RUN_CONFIG, instance=instance, partition_key=None if partition is None else str(partition),
            asset_selection=keys, raise_on_error=False, tags=tags,
        )  # fmt: skip
        return result.success, None if result.success else root_cause(result)
    if partition is not None:
        assert job.partitions_def is not None
        tags.update(job.partitions_def.get_tags_for_partition_key(str(partition)))
    with execute_job(reconstructable(_FACTORIES[job_name]), instance, run_config=RUN_CONFIG, tags=tags,
                     asset_selection=keys) as result:  # fmt: skip
        return result.success, None if result.success else root_cause(result)


def materialize(
    *,
    experiment: str | None = None,
    select: list[str] | None = None,
    with_upstream: bool = True,
    only_models: list[str] | None = None,
    executor: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Summary:
    """Materialize `select` (default: everything) for the active experiment; returns what ran and how it went.

    Only missing or stale partitions run unless `force` (see the module docstring).
    """
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home"))
    if experiment:
        os.environ["ESA_EXPERIMENT"] = experiment  # step processes and resources resolve the same file
    executor = executor or os.environ.get("ESA_RUNNER_EXECUTOR") or "in_process"
    cfg = load_experiment(experiment)
    store = Store()
    # a typo'd name is an error before any work, with or without --no-upstream (it was silently "0 runs")
    check_asset_names(select or [])
    targets = upstream_closure(select or ALL_ASSETS) if with_upstream else (select or ALL_ASSETS)
    models = [m for m in cfg.models if not only_models or m in only_models]
    missing_models = sorted(set(only_models or []) - set(cfg.models))
    if missing_models:
        raise ConfigError(f"models {missing_models} are not in experiment {cfg.name!r}: {list(cfg.models)}")

    loads_before = LOAD_COUNT["loads"]
    with DagsterInstance.get() as instance:
        release_orphaned_runs(instance, log)
        all_plans = partition_plan(cfg, store)
        record_current_hashes(all_plans, cfg.name, store)
        plans = [p for p in all_plans if p.model in models]
        register_partitions(plans, instance)
        record_observations(plans, instance)
        ctx = _Invocation(instance, store, cfg, executor, force, log, Summary())
        for job_name, stage_assets in STAGES:
            assets = [a for a in stage_assets if a in targets]
            if not assets:
                continue
            if job_name == "esa_sweep":
                for plan in plans:
                    ctx.sweep(plan)
            elif job_name == "esa_cross_model":
                ctx.cross_model(assets)
            else:
                for plan in plans:
                    ctx.per_model(job_name, assets, plan.model)
        store.refresh_views()
    ctx.summary.model_loads = LOAD_COUNT["loads"] - loads_before
    return ctx.summary


@dataclass
class _Invocation:
    """One `materialize` call: what ran so far decides what downstream must re-run."""

    instance: DagsterInstance
    store: Store
    cfg: ExperimentConfig
    executor: str
    force: bool
    log: Callable[[str], None]
    summary: Summary
    ran: set[tuple[str, str | None]] = field(default_factory=set)  # (asset, model or None)

    def _run(self, job_name: str, assets: list[str], partition, last=None, label: str | None = None) -> bool:
        started = time.perf_counter()
        ok, error = run_partition(self.instance, job_name, assets, partition, self.executor, last)
        where = label or _partition_str(partition) or "all models"
        outcome = RunOutcome(job_name, assets, where, ok, time.perf_counter() - started, error)
        self.summary.outcomes.append(outcome)
        self.log(f"[{'ok' if ok else 'FAILED'}] {', '.join(assets)} [{where}] {outcome.seconds:.1f}s")
        return ok

    def _stale_or_forced(self, asset: str, model: str, partition: str, config_hash: str) -> bool:
        why_not = not_configured(self.cfg, model, asset)
        if why_not is not None:
            self.summary.skip(f"{asset}: {why_not}")
            return False
        if self.force:
            return True
        if asset in MODEL_ANALYSIS_ASSETS and any((parent, model) in self.ran for parent in UPSTREAM[asset]):
            # Analysis summarises whatever sweep rows are stored (a crashed sweep left fewer): it follows every
            # recomputation. Measuring assets need not: their hash covers all that decides their rows.
            return True
        if up_to_date(self.instance, self.store, asset, partition, config_hash):
            self.summary.skip("up to date (stored partition hash is current)")
            return False
        return True

    def per_model(self, job_name: str, assets: list[str], model: str) -> None:
        if model in self.summary.blocked:
            self.summary.skip(f"{model}: upstream blocked", len(assets))
            return
        todo = [
            a for a in assets if self._stale_or_forced(a, model, model, partition_hash(self.cfg, model, a))
        ]
        ok = True
        if todo:
            ok = self._run(job_name, todo, model)
            self.ran.update((a, model) for a in todo)
        if job_name != "esa_model_stage":
            return
        # A failed blocking check also fails the run: name the check's finding, not the step's wrapper error.
        problem = baseline_problem(self.store, self.cfg, model)
        if problem and (ok or "baseline_sanity" in (self.summary.outcomes[-1].error or "")):
            self.block(model, f"blocking check baseline_sanity failed: {problem}. Fix the model source (weights, "
                              "tokenizer) or the dataset; downstream numbers would be ratios against a broken baseline")
        elif not ok:
            self.block(model, f"model stage failed: {self.summary.outcomes[-1].error or 'see the run log (`make dev`)'}")

    def block(self, model: str, why: str) -> None:
        self.summary.blocked[model] = why
        self.log(f"[BLOCKED] {model}: {why}; its sweeps, analysis and cross-model rows are not computed")

    def sweep(self, plan) -> None:
        model = plan.model
        if model in self.summary.blocked:
            self.summary.skip(f"{model}: upstream blocked", len(plan.variants))
            return
        todo = [v for v in plan.variants
                if self._stale_or_forced("sensitivity", model, str(sweep_key(model, v)),
                                         partition_hash(self.cfg, model, "sensitivity", v))]  # fmt: skip
        for first, last in contiguous_ranges(todo, self.instance.get_dynamic_partitions(VARIANT_DIMENSION)):
            label = f"{model}|{first}" if first == last else f"{model}|{first} ... {last}"
            self._run("esa_sweep", ["sensitivity"], sweep_key(model, first), sweep_key(model, last), label)
        if todo:
            self.ran.add(("sensitivity", model))

    def cross_model(self, assets: list[str]) -> None:
        current = experiment_hash(self.cfg)
        upstream_ran = any(a not in CROSS_MODEL_ASSETS for a, _ in self.ran)
        todo = []
        for asset in assets:
            if self.force or upstream_ran or any((a, None) in self.ran for a in UPSTREAM[asset]):
                todo.append(asset)
            elif recorded_hash(self.instance, asset, None)[0] == current:
                self.summary.skip("up to date (stored partition hash is current)")
            else:
                todo.append(asset)
        if todo:
            self._run("esa_cross_model", todo, None)
            self.ran.update((a, None) for a in todo)


def baseline_problem(store: Store, cfg: ExperimentConfig, model: str) -> str | None:
    """Why the model's stored baseline fails the blocking baseline_sanity check (None: it passes)."""
    from esa_pipeline.defs.model_assets import sanity_check

    baselines = current_model_rows(store, cfg, model, "baselines")
    cards = current_model_rows(store, cfg, model, "models")
    if baselines.empty or cards.empty:
        return "no baseline rows under the current settings"
    result = sanity_check(baselines, random_weights=bool(cards["random_weights"].iloc[0]))
    return None if result.passed else str(result.metadata["problems"].value)


def _partition_str(partition: str | MultiPartitionKey | None) -> str | None:
    return None if partition is None else str(partition)
