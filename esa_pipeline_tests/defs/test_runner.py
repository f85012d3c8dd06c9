"""A CLI run whose process died must not hold the `gpu` pool slot forever (limit 1 = every later run waits)."""

import subprocess
import sys

from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.storage.dagster_run import DagsterRun

from esa_pipeline.defs.runner import owner_tags, release_orphaned_runs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_processes_are_failed_and_their_pool_slots_freed(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        dead = DagsterRun(job_name="esa_sweep", run_id="dead-run", status=DagsterRunStatus.STARTED,
                          tags={**owner_tags(), "esa/pid": str(_dead_pid())})  # fmt: skip
        live = DagsterRun(job_name="esa_sweep", run_id="live-run", status=DagsterRunStatus.STARTED, tags=owner_tags())
        instance.add_run(dead)
        instance.add_run(live)
        assert storage.claim_concurrency_slot("gpu", "dead-run", "sensitivity").is_claimed
        assert not storage.claim_concurrency_slot("gpu", "other-run", "baseline").is_claimed  # blocked by the orphan

        assert release_orphaned_runs(instance, log=lambda _: None) == 1

        assert instance.get_run_by_id("dead-run").status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id("live-run").status == DagsterRunStatus.STARTED  # our own pid is alive
        storage.free_concurrency_slots_for_run("other-run")  # drop its pending claim, then try again
        assert storage.claim_concurrency_slot("gpu", "other-run", "baseline").is_claimed


def test_unknown_assets_and_models_are_refused_before_any_run_with_or_without_upstream(tmp_path, monkeypatch, capsys):
    # `esa materialize --select sensitivty --no-upstream` printed "0 runs" and exited 0; an unknown --models
    # name ended in a traceback instead of the CLI's one-line error
    from esa_pipeline.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("ESA_STORE_DIR", str(tmp_path / "store"))
    (tmp_path / "dagster").mkdir()
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text("protocol: smoke\ndatasets: [bundled]\nwindow: 64\ntoken_budget: 128\nseeds: [1]\n"
                          "strengths: {gaussian: [0.1]}\ncomponents: [ffn.down]\nmodels:\n  tiny-llama: {}\n")
    monkeypatch.setenv("ESA_EXPERIMENT", str(experiment))  # materialize() sets it: restored after the test
    for argv, expected in (
        (["--select", "sensitivty", "--no-upstream"], "unknown assets ['sensitivty'] ('sensitivty': did you mean "
                                                      "'sensitivity'?)"),
        (["--select", "sensitivty"], "unknown assets ['sensitivty']"),
        (["--models", "tiny-llamma"], "models ['tiny-llamma'] are not in experiment 'tiny'"),
    ):  # fmt: skip
        assert main(["materialize", "--experiment", str(experiment), *argv]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_seed_task_without_its_cached_dataset_stops_materialize_before_any_run(tmp_path, monkeypatch, capsys,
                                                                                 hf_datasets_cache):  # fmt: skip
    # issue 12: offline, `hellaswag` without its cached dataset failed in the model stage, after a run had started
    # and loaded the model; now `esa materialize` refuses it while validating, naming the file, key, task and fix
    from esa_pipeline.cli import main
    from esa_pipeline.defs.loaded import LOAD_COUNT

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("ESA_STORE_DIR", str(tmp_path / "store"))
    (tmp_path / "dagster").mkdir()
    experiment = tmp_path / "seeded.yaml"
    experiment.write_text("protocol: smoke\ndatasets: [bundled]\nwindow: 64\ntoken_budget: 128\nseeds: [1]\n"
                          "strengths: {gaussian: [0.1]}\ncomponents: [ffn.down]\nzero_shot: {tasks: [piqa]}\n"
                          "models:\n  tiny-llama: {}\n")
    monkeypatch.setenv("ESA_EXPERIMENT", str(experiment))  # materialize() sets it: restored after the test
    loads = LOAD_COUNT["loads"]
    assert main(["materialize", "--experiment", str(experiment)]) == 2
    err = capsys.readouterr().err
    assert f"{experiment}: invalid experiment config" in err
    assert "zero_shot.tasks: zero-shot task 'piqa' cannot load its dataset 'baber/piqa'" in err
    assert "or remove 'piqa' from the zero-shot tasks of the experiment YAML" in err
    assert LOAD_COUNT["loads"] == loads
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    with DagsterInstance.get() as instance:
        assert not instance.get_run_records()  # no run was started
