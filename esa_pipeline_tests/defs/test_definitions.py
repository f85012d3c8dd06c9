"""The code location loads with every executor, and its asset graph is the documented one."""

import json
import pathlib

import pytest
from dagster import AssetKey, DagsterInstance, DefaultSensorStatus, Definitions

from esa_pipeline.defs import build_definitions

REPO = pathlib.Path(__file__).resolve().parents[2]

CONFIG_SOURCES = {"experiment_config", "baseline_config", "importance_config", "routing_config", "sweep_plan"}
ASSET_KEYS = CONFIG_SOURCES | { "model_card", "baseline", "sensitivity", "significance",
    "critical_layers", "weight_importance", "moe_routing", "architecture_comparison", "scaling_fit", "report",
    "zero_shot_sensitivity",
    "compression",
}  # fmt: skip
CHECK_KEYS = {
    ("baseline", "baseline_sanity"), ("baseline", "baseline_regression"), ("sensitivity", "every_row_restored"),
    ("significance", "significance_quality"), ("scaling_fit", "scaling_fit_quality"),
    ("zero_shot_sensitivity", "every_point_restored"), ("compression", "compression_restored"),
}  # fmt: skip
GPU_ASSETS = {"model_card", "baseline", "sensitivity", "weight_importance", "moe_routing", "zero_shot_sensitivity",
              "compression"}


@pytest.fixture
def reload_definitions(monkeypatch):
    """Rebuild the code location under a patched environment, and rebuild it again afterwards: later tests
    (and executors that reconstruct jobs from `esa_pipeline.definitions`) must not see the patched executor."""
    import importlib

    import esa_pipeline.definitions as module

    yield lambda: importlib.reload(module).defs
    monkeypatch.undo()
    importlib.reload(module)


@pytest.mark.parametrize("executor", ["multiprocess", "in_process", "k8s"])
def test_definitions_load_with_each_executor(monkeypatch, reload_definitions, executor):
    monkeypatch.setenv("ESA_EXECUTOR", executor)
    defs = reload_definitions()
    Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("esa_sweep").executor_def.name == {"k8s": "k8s"}.get(executor, executor)


def test_unknown_executor_names_the_choices(monkeypatch):
    monkeypatch.setenv("ESA_EXECUTOR", "ray")
    with pytest.raises(ValueError, match="multiprocess, in_process, k8s"):
        build_definitions()


def test_asset_graph_snapshot():
    graph = build_definitions().resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSET_KEYS
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == CHECK_KEYS
    assert graph.get(AssetKey("sensitivity")).partitions_def.partition_dimension_names == ["model", "variant"]
    blocking = {
        (k.asset_key.to_user_string(), k.name)
        for k in graph.asset_check_keys
        if graph.get_check_spec(k).blocking
    }
    assert blocking == {("baseline", "baseline_sanity"), ("sensitivity", "every_row_restored"),
                        ("zero_shot_sensitivity", "every_point_restored"), ("compression", "compression_restored")}
    # one model's failed baseline check blocks only that model's partitions
    assert graph.get(AssetKey("baseline")).partitions_def == graph.get_check_spec(
        next(k for k in graph.asset_check_keys if k.name == "baseline_sanity")).partitions_def


def test_sweep_backfills_run_many_partitions_per_run():
    """A backfill of one model's sweep partitions loads the model and builds its prefix cache once per run."""
    from esa_pipeline.defs.sweep_assets import SWEEP_PARTITIONS_PER_RUN

    policy = build_definitions().resolve_assets_def("sensitivity").backfill_policy
    assert policy.policy_type.value == "MULTI_RUN"
    assert policy.max_partitions_per_run == SWEEP_PARTITIONS_PER_RUN > 1


def test_model_heavy_steps_share_the_gpu_pool_and_request_a_gpu_on_k8s():
    defs = build_definitions()
    for key in ASSET_KEYS - CONFIG_SOURCES:
        node = defs.resolve_assets_def(key).node_def
        assert (node.pool == "gpu") == (key in GPU_ASSETS), key
        if key in GPU_ASSETS:
            k8s_config = json.loads(node.tags["dagster-k8s/config"])  # op tags are stored JSON-encoded
            limits = k8s_config["container_config"]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "1"


def test_sensors_run_by_default_and_schedules_exist():
    defs = build_definitions()
    for name in ("esa_experiment_sensor", "esa_automation"):
        assert defs.resolve_sensor_def(name).default_status == DefaultSensorStatus.RUNNING
    assert {s.name for s in defs.schedules} == {"nightly_model_backfill", "nightly_sweep_backfill"}


def test_instance_config_limits_the_gpu_pool_to_one(tmp_path):
    home = REPO / ".dagster_home"
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_workspace_points_at_the_definitions_module():
    text = (REPO / "workspace.yaml").read_text()
    assert "module_name: esa_pipeline.definitions" in text
