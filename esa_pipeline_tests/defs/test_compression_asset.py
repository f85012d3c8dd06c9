"""The compression asset on a tiny model: every relation lands under the compression hash; models outside
`compression.models` materialize without rows."""

import pytest
from dagster import DagsterInstance, materialize

from esa_pipeline.core.config import ConfigError, load_experiment, partition_hash
from esa_pipeline.defs.compression_assets import COMPRESSION_RELATIONS, compression, compression_rows
from esa_pipeline.defs.planning import partition_plan, register_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource

SECTION = """
compression:
  models: [tiny-llama]
  components: [attention.value, ffn.down]
  layers: [0, 1]
  bits: [2, 4, 8]
  sparsities: [0.25, 0.5]
"""


def run(esa_env, model: str):
    with DagsterInstance.ephemeral() as instance:
        register_partitions(partition_plan(load_experiment(esa_env.experiment), esa_env.store), instance)
        return materialize([compression], partition_key=model, instance=instance,
                           resources={"experiment": ExperimentResource(), "store": StoreResource()})


def test_compression_partition_writes_every_relation_under_its_own_hash(esa_env):
    before = load_experiment(esa_env.experiment)
    esa_env.experiment.write_text(esa_env.experiment.read_text() + SECTION)
    cfg = load_experiment(esa_env.experiment)
    # the section changes only the compression asset's hash, never the baseline's or a sweep's
    for asset in ("baseline", "weight_importance"):
        assert partition_hash(cfg, "tiny-llama", asset) == partition_hash(before, "tiny-llama", asset)
    assert partition_hash(cfg, "tiny-llama", "sensitivity", "ffn.gate__1") == partition_hash(
        before, "tiny-llama", "sensitivity", "ffn.gate__1")
    assert run(esa_env, "tiny-llama").success
    h = partition_hash(cfg, "tiny-llama", "compression")
    for relation in COMPRESSION_RELATIONS.values():
        rows = compression_rows(esa_env.store, relation, cfg)
        assert len(rows) and (rows["config_hash"] == h).all() and (rows["model"] == "tiny-llama").all(), relation
    sens = compression_rows(esa_env.store, "compression_sensitivity", cfg)
    assert sens.groupby("kind").size().to_dict() == {"quantize": 12, "prune": 8, "layer_drop": 6}
    recipe = compression_rows(esa_env.store, "compression_recipe", cfg)
    assert sorted(zip(recipe["kind"], recipe["allocation"], strict=True)) == [
        ("prune", "recipe"), ("prune", "uniform"), ("quantize", "recipe"), ("quantize", "uniform")]
    assert recipe["restored"].all()
    with esa_env.store.connect() as con:
        # Block Influence costs no forward, so it covers all 4 layers of tiny-llama, not only the swept [0, 1]
        assert con.execute("SELECT count(*) FROM block_influence").fetchone()[0] == 4


def test_models_outside_the_section_materialize_without_rows(esa_env):
    esa_env.experiment.write_text(esa_env.experiment.read_text() + SECTION)
    result = run(esa_env, "tiny-pythia")
    assert result.success and not esa_env.store.has("compression_recipe")


def test_a_budget_that_is_not_measured_is_refused_before_any_work(esa_env):
    esa_env.experiment.write_text(esa_env.experiment.read_text() + SECTION + "  bit_budget: 3.0\n")
    with pytest.raises(ConfigError, match="bit_budget"):
        load_experiment(esa_env.experiment)
