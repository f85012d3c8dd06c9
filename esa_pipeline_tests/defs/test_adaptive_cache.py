"""With adaptive budgets on, the sweep's shared prefix cache is built from the baseline's visit order, so every
adaptive point replays from it (a cache of the document order would be refused)."""

from dagster import AssetKey, DagsterInstance

from esa_pipeline.core import Perturbation
from esa_pipeline.core.config import load_experiment, model_plan
from esa_pipeline.core.evaluation.sweep import run_sweep
from esa_pipeline.defs import build_definitions
from esa_pipeline.defs.loaded import baseline_result, forget_models, loaded_model, prefix_cache
from esa_pipeline.defs.planning import partition_plan, register_partitions
from esa_pipeline.defs.runner import RUN_CONFIG
from esa_pipeline_tests.defs.conftest import TINY_EXPERIMENT


def test_the_sweep_cache_follows_the_visit_order_when_adaptive_budgets_are_on(tmp_path):
    path = tmp_path / "x.yaml"
    plans = {}
    for enabled in (False, True):
        path.write_text(TINY_EXPERIMENT + f"adaptive: {{enabled: {str(enabled).lower()}, min_windows: 2}}\n")
        plans[enabled] = model_plan(load_experiment(path, check_models=False), "tiny-llama")
    try:
        assert prefix_cache(plans[False], "bundled").base.visit_seed is None
        plan = plans[True]
        cache = prefix_cache(plan, "bundled")
        assert cache.base.visit_seed == 0
        base = baseline_result(plan, "bundled")
        specs = [Perturbation(kind="gaussian", component="ffn.gate", layer=1, strength=0.1, seed=1)]
        rows, windows = run_sweep(loaded_model(plan), base, specs, cache=cache, rule=plan.adaptive.rule())
        assert bool(rows["used_prefix_cache"].all()) and bool(rows["restored"].all())
        assert rows["cs_windows"].tolist() == [len(windows)] and int(windows["n_tokens"].sum()) == rows["n_tokens"][0]
    finally:
        forget_models()


def test_a_budget_with_fewer_windows_than_min_windows_fails_the_model_stage_naming_file_key_and_fix(esa_env):
    # 64 tokens in windows of 32 on the bundled documents: 2 windows, below min_windows 16 (the default)
    esa_env.edit("models:", "adaptive: {enabled: true}\nmodels:")
    with DagsterInstance.ephemeral() as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)
        job = build_definitions(executor="in_process").resolve_job_def("esa_model_stage")
        result = job.execute_in_process(run_config=RUN_CONFIG, instance=instance, partition_key="tiny-llama",
                                        asset_selection=[AssetKey("baseline")], raise_on_error=False)
    assert not result.success
    error = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error
    message = error.cause.message if error.cause else error.message  # the ConfigError under Dagster's wrapper
    assert str(esa_env.experiment) in message and "adaptive.min_windows = 16" in message
    assert "has only 2 windows" in message and "Fix: set adaptive.min_windows <= 2" in message
    assert not esa_env.store.has("baselines")  # nothing stored for a budget the sweeps could not use
