"""Incremental rebuild: editing one model's section re-runs only that model's partitions; new models register."""

import datetime

import pandas as pd
import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    DefaultScheduleStatus,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from esa_pipeline.core.config import load_experiment, partition_hash
from esa_pipeline.defs import build_definitions
from esa_pipeline.defs.automation import NIGHTLY_ENV, experiment_sensor
from esa_pipeline.defs.partitions import RANGE_END, RANGE_START, sweep_key
from esa_pipeline.defs.planning import partition_plan, record_observations, register_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource

PER_MODEL = ["model_card", "baseline", "weight_importance", "moe_routing", "significance", "critical_layers"]
CROSS_MODEL = ["architecture_comparison", "scaling_fit", "report"]


def observe(env, instance):
    plans = partition_plan(load_experiment(env.experiment), env.store)
    register_partitions(plans, instance)
    record_observations(plans, instance)
    return plans


def baseline_checked(instance, model: str, passed: bool = True) -> None:
    """Record the blocking baseline_sanity result of one model's latest baseline, as its run would."""
    record = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("baseline"), asset_partitions=[model]), limit=1
    ).records[0]
    target = AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
    )
    instance.report_runless_asset_event(AssetCheckEvaluation(
        asset_key=AssetKey("baseline"), check_name="baseline_sanity", passed=passed, partition=model, blocking=True,
        target_materialization_data=target,
    ))  # fmt: skip


def materialize_everything(instance, plans, only_model=None):
    """Record materializations as a completed backfill would (no model work needed to test the conditions)."""
    for plan in plans:
        if only_model and plan.model != only_model:
            continue
        for asset in PER_MODEL:
            instance.report_runless_asset_event(AssetMaterialization(asset, partition=plan.model))
        baseline_checked(instance, plan.model)
        for variant in plan.variants:
            instance.report_runless_asset_event(AssetMaterialization("sensitivity", partition=str(sweep_key(plan.model, variant))))
    for asset in CROSS_MODEL:
        instance.report_runless_asset_event(AssetMaterialization(asset))


def requested_assets(result) -> set[str]:
    return {a for a in [*PER_MODEL, "sensitivity", *CROSS_MODEL] if result.get_num_requested(AssetKey(a))}


def requested(result, asset):
    return {str(p) for p in result.get_requested_partitions(AssetKey(asset))}


def test_editing_one_model_section_requests_only_that_models_partitions(esa_env):
    defs = build_definitions()
    with DagsterInstance.ephemeral() as instance:
        plans = observe(esa_env, instance)
        materialize_everything(instance, plans)
        first = evaluate_automation_conditions(defs, instance)
        assert first.total_requested == 0, "a fully materialized experiment requests nothing"

        esa_env.edit("  tiny-pythia: {}", "  tiny-pythia: {token_budget: 32}")
        observe(esa_env, instance)
        second = evaluate_automation_conditions(defs, instance, cursor=first.cursor)

        # the token budget decides every measurement of tiny-pythia, not its card
        assert requested(second, "model_card") == set()
        for asset in ("baseline", "weight_importance", "moe_routing"):
            assert requested(second, asset) == {"tiny-pythia"}, asset
        # Pythia has no ffn.gate: only its attention.query sweeps, never the inapplicable pair.
        assert requested(second, "sensitivity") == {"tiny-pythia|attention.query__1", "tiny-pythia|attention.query__2"}
        for asset in PER_MODEL:
            assert requested(second, asset) <= {"tiny-pythia"}, asset

        # Once the edited model's sweeps have landed, its analysis (and only its) follows.
        for variant in ("attention.query__1", "attention.query__2"):
            instance.report_runless_asset_event(AssetMaterialization("sensitivity", partition=f"tiny-pythia|{variant}"))
        third = evaluate_automation_conditions(defs, instance, cursor=second.cursor)
        assert requested(third, "significance") == {"tiny-pythia"}


def test_inapplicable_sweep_partitions_are_never_requested(esa_env):
    defs = build_definitions()
    with DagsterInstance.ephemeral() as instance:
        plans = observe(esa_env, instance)
        materialize_everything(instance, [p for p in plans if p.model == "tiny-llama"])
        for asset in ("model_card", "baseline"):
            instance.report_runless_asset_event(AssetMaterialization(asset, partition="tiny-pythia"))
        result = evaluate_automation_conditions(defs, instance)
        sweeps = requested(result, "sensitivity")
        assert not {p for p in sweeps if p.startswith("tiny-pythia|ffn.gate")}
        pythia = next(p for p in plans if p.model == "tiny-pythia")
        assert pythia.not_applicable == ["ffn.gate"]


def test_sensor_registers_models_added_to_the_yaml_and_observes_changed_versions(esa_env):
    resources = {"experiment": ExperimentResource(), "store": StoreResource()}
    with DagsterInstance.ephemeral() as instance:
        with build_sensor_context(instance=instance, resources=resources) as context:
            first = experiment_sensor(context)
        added = {r.partitions_def_name: set(r.partition_keys) for r in first.dynamic_partitions_requests}
        assert added["model"] == {"tiny-llama", "tiny-pythia"}
        assert added["variant"] == {"attention.query__1", "attention.query__2", "ffn.gate__1", "ffn.gate__2"}
        assert len(first.asset_events) == 4 * 2 + 6  # 4 config sources per model + per applicable sweep partition
        for request in first.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))

        esa_env.edit("models:\n", "models:\n  tiny-mistral: {}\n")
        with build_sensor_context(instance=instance, resources=resources, cursor=first.cursor) as context:
            second = experiment_sensor(context)
        added = {r.partitions_def_name: set(r.partition_keys) for r in second.dynamic_partitions_requests}
        assert added == {"model": {"tiny-mistral"}}
        changed = {(e.asset_key.to_user_string(), e.partition) for e in second.asset_events}
        assert ("experiment_config", "tiny-mistral") in changed
        assert not {c for c in changed if "tiny-llama" in c[1]}, "unchanged models are not re-observed"


def nightly(name: str):
    return next(s for s in build_definitions().schedules if s.name == name)


def test_nightly_sweep_backfill_requests_one_run_per_models_missing_range_idempotently(esa_env, tmp_path):
    resources = {"experiment": ExperimentResource(), "store": StoreResource()}
    schedule = nightly("nightly_sweep_backfill")
    with DagsterInstance.local_temp(str(tmp_path)) as instance:  # schedules read it by reference
        observe(esa_env, instance)
        night = datetime.datetime(2026, 1, 2, 3, tzinfo=datetime.UTC)
        ticks = []
        for _ in range(2):
            with build_schedule_context(instance=instance, resources=resources, scheduled_execution_time=night) as ctx:
                ticks.append(schedule(ctx))
        runs, again = ticks
    ranges = sorted((r.tags[RANGE_START], r.tags[RANGE_END]) for r in runs)
    # tiny-llama's four sweep partitions in one run (one model load); tiny-pythia's two (it has no ffn.gate)
    assert ranges == [("tiny-llama|attention.query__1", "tiny-llama|ffn.gate__2"),
                      ("tiny-pythia|attention.query__1", "tiny-pythia|attention.query__2")]  # fmt: skip
    assert [r.run_key for r in runs] == [r.run_key for r in again]
    assert all(r.run_key.startswith("2026-01-02:") for r in runs)


def test_nightly_backfills_run_by_default_and_can_be_defined_stopped(monkeypatch):
    monkeypatch.delenv(NIGHTLY_ENV, raising=False)
    assert {s.name: s.default_status for s in build_definitions().schedules} == {
        "nightly_model_backfill": DefaultScheduleStatus.RUNNING, "nightly_sweep_backfill": DefaultScheduleStatus.RUNNING}
    monkeypatch.setenv(NIGHTLY_ENV, "off")
    assert {s.default_status for s in build_definitions().schedules} == {DefaultScheduleStatus.STOPPED}
    monkeypatch.setenv(NIGHTLY_ENV, "sometimes")
    with pytest.raises(ValueError, match="ESA_NIGHTLY_BACKFILL='sometimes': use on"):
        build_definitions()


def test_nightly_model_backfill_requests_models_without_a_current_baseline(esa_env):
    resources = {"experiment": ExperimentResource(), "store": StoreResource()}
    cfg = load_experiment(esa_env.experiment)
    esa_env.store.write("baselines", "tiny-llama", pd.DataFrame(
        {"model": ["tiny-llama"], "config_hash": [partition_hash(cfg, "tiny-llama", "baseline")]}))  # fmt: skip
    esa_env.store.write("baselines", "tiny-pythia", pd.DataFrame({"model": ["tiny-pythia"], "config_hash": ["older"]}))
    with DagsterInstance.ephemeral() as instance:
        night = datetime.datetime(2026, 1, 2, 2, tzinfo=datetime.UTC)
        with build_schedule_context(instance=instance, resources=resources, scheduled_execution_time=night) as ctx:
            runs = nightly("nightly_model_backfill")(ctx)
    assert [r.partition_key for r in runs] == ["tiny-pythia"]  # stale hash; tiny-llama's baseline is current


def automation_after_edit(env, old: str, new: str):
    """Requests of the automation sensor after editing the YAML of a fully materialized experiment."""
    defs = build_definitions()
    with DagsterInstance.ephemeral() as instance:
        plans = observe(env, instance)
        materialize_everything(instance, plans)
        first = evaluate_automation_conditions(defs, instance)
        assert first.total_requested == 0
        env.edit(old, new)
        observe(env, instance)
        return evaluate_automation_conditions(defs, instance, cursor=first.cursor)


def test_automation_adding_a_seed_runs_only_the_new_sweep_partitions(esa_env):
    result = automation_after_edit(esa_env, "seeds: [1, 2]", "seeds: [1, 2, 999]")
    assert requested(result, "sensitivity") == {"tiny-llama|attention.query__999", "tiny-llama|ffn.gate__999",
                                                "tiny-pythia|attention.query__999"}  # fmt: skip
    assert requested(result, "model_card") == requested(result, "baseline") == set()
    # importance validation and routing draw one point per seed: they follow the seed list
    assert requested(result, "weight_importance") == requested(result, "moe_routing") == {"tiny-llama", "tiny-pythia"}


def test_automation_editing_importance_runs_only_importance(esa_env):
    result = automation_after_edit(esa_env, "top_k: 2", "top_k: 3")
    assert requested_assets(result) == {"weight_importance"}
    assert requested(result, "weight_importance") == {"tiny-llama", "tiny-pythia"}


def test_automation_editing_one_components_strengths_runs_only_its_partitions(esa_env):
    result = automation_after_edit(esa_env, "neurons: [0.25]", "neurons: [0.5]")
    assert requested_assets(result) == {"sensitivity"}
    assert requested(result, "sensitivity") == {"tiny-llama|ffn.gate__1", "tiny-llama|ffn.gate__2"}


def test_a_failed_blocking_baseline_check_stops_that_models_downstream_automation(esa_env):
    defs = build_definitions()
    with DagsterInstance.ephemeral() as instance:
        start = evaluate_automation_conditions(defs, instance)  # deployed before the models were added
        observe(esa_env, instance)  # the sensor registers both models: their partitions are newly missing
        added = evaluate_automation_conditions(defs, instance, cursor=start.cursor)
        assert requested(added, "model_card") == {"tiny-llama", "tiny-pythia"}
        # Same partitions as the baseline: requested into the baseline's run, where Dagster skips them when
        # the blocking check fails. The sweep (other partitions, other runs) waits for the check instead.
        for asset in ("baseline", "weight_importance", "moe_routing"):
            assert requested(added, asset) == {"tiny-llama", "tiny-pythia"}, asset
        assert requested(added, "sensitivity") == set()
        for model in ("tiny-llama", "tiny-pythia"):
            for asset in ("model_card", "baseline"):
                instance.report_runless_asset_event(AssetMaterialization(asset, partition=model))
        baseline_checked(instance, "tiny-llama", passed=True)
        baseline_checked(instance, "tiny-pythia", passed=False)  # e.g. a broken local checkpoint, PPL 50,000
        result = evaluate_automation_conditions(defs, instance, cursor=added.cursor)
    assert {p.split("|")[0] for p in requested(result, "sensitivity")} == {"tiny-llama"}
