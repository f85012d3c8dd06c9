"""A real run of zero_shot_sensitivity on a tiny model: sweep points chosen by ΔNLL, rows in DuckDB."""

from dagster import AssetKey, DagsterInstance

from esa_pipeline.core.config import load_experiment
from esa_pipeline.defs import build_definitions
from esa_pipeline.defs.planning import partition_plan, register_partitions
from esa_pipeline.defs.runner import RUN_CONFIG
from esa_pipeline_tests.defs.test_materialize import run_sweep_partition

ZERO_SHOT = "zero_shot: {tasks: [esa_reading], limit: 3, at: {top_delta_nll: 2, random_controls: 1}}\nseeds: [1, 2]"


def test_zero_shot_points_land_with_verified_restore_and_paired_summaries(esa_env):
    esa_env.edit("seeds: [1, 2]", ZERO_SHOT)
    with DagsterInstance.ephemeral() as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)
        for variant in ("attention.query__1", "ffn.gate__1"):
            assert run_sweep_partition(instance, "tiny-llama", variant).success
        job = build_definitions(executor="in_process").resolve_job_def("esa_model_analysis")
        result = job.execute_in_process(run_config=RUN_CONFIG, instance=instance, partition_key="tiny-llama",
                                        asset_selection=[AssetKey("zero_shot_sensitivity")])
    assert result.success
    assert [(c.check_name, c.passed) for c in result.get_asset_check_evaluations()] == [("every_point_restored", True)]
    rows = esa_env.store.read("zero_shot_sensitivity", "tiny-llama")
    assert len(rows) == 3 * 3 and rows["restored"].all() and rows["random_weights"].all()
    assert rows.groupby("selected_by")["layer"].size().to_dict() == {"random_control": 3, "top_delta_nll": 6}
    sens = esa_env.store.read("sensitivity")
    top = sens.sort_values("delta_nll", ascending=False).head(2)
    chosen = rows.loc[rows["selected_by"] == "top_delta_nll"].drop_duplicates(["component", "layer", "kind", "strength"])
    assert set(zip(chosen["component"], chosen["layer"], chosen["kind"], strict=True)) == set(
        zip(top["component"], top["layer"], top["kind"], strict=True))
    summary = esa_env.store.read("zero_shot_significance", "tiny-llama")
    assert len(summary) == 3 and (summary["n_items"] == 3).all() and summary["mcnemar_p"].between(0, 1).all()
    with esa_env.store.connect() as con:
        assert con.execute("SELECT count(*) FROM zero_shot_sensitivity WHERE model = 'tiny-llama'").fetchone()[0] == 9
        assert con.execute("SELECT count(*) FROM task_vs_perplexity WHERE task = 'all'").fetchone()[0] == 1
