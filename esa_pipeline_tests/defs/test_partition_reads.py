"""An asset of one partition reads only its own partitions' files (issue 15 item 4).

`significance` for tiny-llama once read every model's sensitivity files through the relation's glob, so one
damaged Parquet file in SmolLM2's partition failed every other model's analysis.
"""

import pytest
from dagster import DagsterInstance, materialize

from esa_pipeline.core.config import load_experiment
from esa_pipeline.defs import build_definitions
from esa_pipeline.defs.analysis_assets import significance
from esa_pipeline.defs.partitions import sweep_key
from esa_pipeline.defs.planning import partition_plan, register_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.runner import RUN_CONFIG


@pytest.fixture
def instance(esa_env):
    with DagsterInstance.ephemeral() as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)
        yield instance


def test_damaged_file_of_another_model_does_not_break_this_models_significance(esa_env, instance):
    job = build_definitions(executor="in_process").resolve_job_def("esa_sweep")
    for variant in ("ffn.gate__1", "ffn.gate__2"):
        assert job.execute_in_process(run_config=RUN_CONFIG, instance=instance,
                                      partition_key=str(sweep_key("tiny-llama", variant))).success  # fmt: skip
    store = esa_env.store
    for relation in ("sensitivity", "sensitivity_windows"):  # SmolLM2's partition, damaged (a torn copy, a bad disk)
        store.partition_path(relation, "smollm2-135m|ffn.down__1").write_bytes(b"PAR1 this is not a parquet file")

    result = materialize([significance], partition_key="tiny-llama", instance=instance,
                         resources={"experiment": ExperimentResource(), "store": StoreResource()})  # fmt: skip
    assert result.success
    tested = store.read("significance", "tiny-llama")
    sens = store.read("sensitivity", partitions=store.model_partitions("sensitivity", "tiny-llama"))
    # one cell per (kind, component, layer, strength): both seeds of ffn.gate on layers 0 and 1, two kinds
    assert len(tested) == 4 == len(sens.groupby(["kind", "component", "layer", "strength"]))
    assert (tested["n_seeds"] == 2).all() and (tested["model"] == "tiny-llama").all()
