"""Real runs of the sweep asset on tiny models into a temporary store."""

import concurrent.futures
import subprocess
import sys
import textwrap

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, execute_job, reconstructable

from esa_pipeline.core import storage
from esa_pipeline.core.config import load_experiment, partition_hash
from esa_pipeline.defs import build_definitions
from esa_pipeline.defs.partitions import sweep_key
from esa_pipeline.defs.planning import partition_plan, register_partitions
from esa_pipeline.defs.runner import RUN_CONFIG, sweep_job


def run_sweep_partition(instance, model: str, variant: str, *, raise_on_error: bool = True):
    job = build_definitions(executor="in_process").resolve_job_def("esa_sweep")
    return job.execute_in_process(run_config=RUN_CONFIG, instance=instance, partition_key=str(sweep_key(model, variant)),
                                  raise_on_error=raise_on_error)  # fmt: skip


@pytest.fixture
def instance(esa_env):
    with DagsterInstance.ephemeral() as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)
        yield instance


def test_one_sensitivity_partition_lands_in_the_store_and_the_database(esa_env, instance):
    result = run_sweep_partition(instance, "tiny-llama", "ffn.gate__1")
    assert result.success
    rows = esa_env.store.read("sensitivity", "tiny-llama|ffn.gate__1")
    # layers [0, 1] x (gaussian 0.1 + neurons 0.25): the kinds configured for an FFN component
    assert sorted(zip(rows["layer"], rows["kind"], strict=True)) == [
        (0, "gaussian"), (0, "neurons"), (1, "gaussian"), (1, "neurons")]  # fmt: skip
    assert rows["restored"].all() and (rows["variant"] == "ffn.gate__1").all()
    assert (rows["config_hash"] == partition_hash(load_experiment(esa_env.experiment), "tiny-llama", "sensitivity", "ffn.gate__1")).all()
    windows = esa_env.store.read("sensitivity_windows", "tiny-llama|ffn.gate__1")
    assert len(windows) == len(rows) * windows["window_id"].nunique()
    # each window row says which perturbation it belongs to, neuron mode included
    assert set(zip(windows["kind"], windows["mode"], strict=True)) == set(zip(rows["kind"], rows["mode"], strict=True))
    with esa_env.store.connect() as con:
        stored = con.execute("SELECT count(*) FROM sensitivity WHERE model = 'tiny-llama'").fetchone()[0]
    assert stored == 4
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("every_row_restored", True)]


def test_failure_while_rewriting_a_partition_leaves_the_old_rows(esa_env, instance, monkeypatch):
    assert run_sweep_partition(instance, "tiny-llama", "attention.query__1").success
    before = esa_env.store.read("sensitivity", "tiny-llama|attention.query__1")
    real_write = pq.write_table

    def die_mid_sensitivity_write(table, where, **kwargs):
        if "/sensitivity/" in str(where):
            real_write(table.slice(0, 1), where, **kwargs)  # half a file on disk when the process dies
            raise OSError("injected: disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(storage.pq, "write_table", die_mid_sensitivity_write)
    failed = run_sweep_partition(instance, "tiny-llama", "attention.query__1", raise_on_error=False)
    monkeypatch.undo()
    assert not failed.success
    after = esa_env.store.read("sensitivity", "tiny-llama|attention.query__1")
    pd.testing.assert_frame_equal(after, before)  # same rows, same created_at: nothing was lost or half-written
    assert [p.name for p in esa_env.store.relation_dir("sensitivity").iterdir()] == ["tiny-llama+attention.query__1.parquet"]


def test_run_succeeds_while_another_process_reads_the_database(esa_env, instance):
    assert run_sweep_partition(instance, "tiny-pythia", "attention.query__1").success  # the views exist now
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys
            con = duckdb.connect({str(esa_env.store.db_path)!r}, read_only=True)
            print(con.execute("SELECT count(*) FROM sensitivity").fetchone()[0], flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "2"  # the reader is connected and holds the file
        assert run_sweep_partition(instance, "tiny-pythia", "attention.query__2").success
        assert esa_env.store.has("sensitivity", "tiny-pythia|attention.query__2")
    finally:
        reader.communicate("\n", timeout=60)
    with esa_env.store.connect() as con:
        assert con.execute("SELECT count(*) FROM sensitivity").fetchone()[0] == 4


@pytest.mark.slow
def test_four_partitions_run_concurrently_with_the_multiprocess_executor_land_exactly_once(esa_env, tmp_path):
    partitions = [("tiny-llama", "attention.query__1"), ("tiny-llama", "attention.query__2"),
                  ("tiny-llama", "ffn.gate__1"), ("tiny-pythia", "attention.query__1")]  # fmt: skip
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)

        def run(model_variant):
            tags = {"dagster/partition": str(sweep_key(*model_variant)),
                    "dagster/partition/model": model_variant[0], "dagster/partition/variant": model_variant[1]}
            with execute_job(reconstructable(sweep_job), instance, run_config=RUN_CONFIG, tags=tags) as result:
                errors = [str(e.event_specific_data.error) for e in result.all_events if e.is_failure]
                return result.success, result.job_def.executor_def.name, errors  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = list(pool.map(run, partitions))
    assert [(ok, executor) for ok, executor, _ in outcomes] == [(True, "multiprocess")] * 4, [e for *_, e in outcomes]
    assert esa_env.store.refresh_views()
    with esa_env.store.connect() as con:
        counts = con.execute(
            "SELECT model, variant, count(*) AS n, count(DISTINCT layer || kind) AS points "
            "FROM sensitivity GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    expected_points = {"attention.query__1": 2, "attention.query__2": 2, "ffn.gate__1": 4}
    assert counts == [(m, v, expected_points[v], expected_points[v]) for m, v in sorted(partitions)]
