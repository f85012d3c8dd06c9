"""Partition hashes cover exactly the settings that change a partition's rows (issue 15 item 3)."""

import pytest

from esa_pipeline.core.config import (
    HASHED_ASSETS,
    UNHASHED_SETTINGS,
    ModelPlan,
    load_experiment,
    partition_hash,
)
from esa_pipeline.defs.planning import partition_plan

MODEL_ASSETS = [a for a in HASHED_ASSETS if a != "sensitivity"]


def hashes(env) -> dict[tuple[str, str], str]:
    """(model, asset or sweep partition) -> hash, for every partition of the experiment."""
    out = {}
    for plan in partition_plan(load_experiment(env.experiment), env.store):
        out.update({(plan.model, asset): h for asset, h in plan.hashes.items()})
        out.update({(plan.model, f"sensitivity|{v}"): h for v, h in plan.variant_hashes.items()})
    return out


def changed_after(env, old: str, new: str) -> set[tuple[str, str]]:
    before = hashes(env)
    env.edit(old, new)
    after = hashes(env)
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def test_every_setting_is_attributed_to_an_asset_or_declared_irrelevant():
    attributed = {name.split(".")[0] for spec in HASHED_ASSETS.values() for name in spec.settings}
    missing = set(ModelPlan.model_fields) - attributed - set(UNHASHED_SETTINGS)
    assert not missing, f"add {missing} to core.config.HASHED_ASSETS (or UNHASHED_SETTINGS with a reason)"


def test_adding_a_seed_adds_sweep_partitions_and_reversions_no_existing_one(esa_env):
    changed = changed_after(esa_env, "seeds: [1, 2]", "seeds: [1, 2, 999]")
    sweeps = {k for k in changed if k[1].startswith("sensitivity|")}
    assert sweeps == {("tiny-llama", "sensitivity|attention.query__999"), ("tiny-llama", "sensitivity|ffn.gate__999"),
                      ("tiny-pythia", "sensitivity|attention.query__999")}  # fmt: skip
    # per-model assets that read the seed list (importance validation, routing draws) and the analysis follow
    per_model = {asset for _, asset in changed - sweeps}
    assert per_model == {"weight_importance", "moe_routing", "significance", "critical_layers",
                         "zero_shot_sensitivity"}


def test_editing_importance_settings_reversions_only_importance(esa_env):
    changed = changed_after(esa_env, "top_k: 2", "top_k: 3")
    assert changed == {("tiny-llama", "weight_importance"), ("tiny-pythia", "weight_importance")}


def test_editing_one_components_strengths_reversions_only_its_partitions(esa_env):
    # neurons strengths apply to ffn.* only: tiny-pythia has no ffn.gate, so nothing of it changes
    changed = changed_after(esa_env, "neurons: [0.25]", "neurons: [0.5]")
    assert changed == {("tiny-llama", "sensitivity|ffn.gate__1"), ("tiny-llama", "sensitivity|ffn.gate__2"),
                       ("tiny-llama", "significance"), ("tiny-llama", "critical_layers"),
                       ("tiny-llama", "zero_shot_sensitivity")}  # fmt: skip


def test_zero_shot_settings_reversion_only_the_zero_shot_assets(esa_env):
    esa_env.edit("importance:", "zero_shot: {tasks: [esa_mc], limit: 4}\nimportance:")
    changed = changed_after(esa_env, "limit: 4", "limit: 8")
    assert {asset for _, asset in changed} == {"baseline", "zero_shot_sensitivity"}
    # the points scored under perturbation are not the baseline's business
    changed = changed_after(esa_env, "limit: 8}", "limit: 8, at: {top_delta_nll: 2}}")
    assert {asset for _, asset in changed} == {"zero_shot_sensitivity"}


@pytest.mark.parametrize("old,new", [("window: 32", "window: 16"), ("token_budget: 64", "token_budget: 48")])
def test_evaluation_settings_reversion_every_measurement(esa_env, old, new):
    changed = changed_after(esa_env, old, new)
    assert {asset for _, asset in changed if not asset.startswith("sensitivity|")} == set(MODEL_ASSETS) - {"model_card"}
    assert len([k for k in changed if k[1].startswith("sensitivity|")]) == 6


def test_hash_is_per_partition_and_stable(esa_env):
    cfg = load_experiment(esa_env.experiment)
    a = partition_hash(cfg, "tiny-llama", "sensitivity", "ffn.gate__1")
    assert a == partition_hash(load_experiment(esa_env.experiment), "tiny-llama", "sensitivity", "ffn.gate__1")
    assert a != partition_hash(cfg, "tiny-llama", "sensitivity", "ffn.gate__2")
    assert a != partition_hash(cfg, "tiny-pythia", "sensitivity", "ffn.gate__1")


def test_seed_independent_kinds_have_one_fixed_partition_that_adding_a_seed_leaves_alone(esa_env):
    esa_env.edit("components: [attention.query, ffn.gate]", "components: [attention.query, norm.input]")
    before = hashes(esa_env)
    # norm scale does not depend on the seed: one norm.input__fixed partition, seeds hold gaussian only
    assert {k[1] for k in before if k[0] == "tiny-llama" and "norm.input" in k[1]} == {
        "sensitivity|norm.input__fixed", "sensitivity|norm.input__1", "sensitivity|norm.input__2"}  # fmt: skip
    changed = changed_after(esa_env, "seeds: [1, 2]", "seeds: [1, 2, 999]")
    assert ("tiny-llama", "sensitivity|norm.input__999") in changed
    assert ("tiny-llama", "sensitivity|norm.input__fixed") not in changed
    assert not {k for k in changed if k[1].startswith("sensitivity|") and not k[1].endswith("__999")}


def test_a_large_sigma_reversions_the_sweeps_but_not_the_prediction_check(esa_env):
    # the prediction check measures gaussian σ <= 0.05 only: σ = 0.2 adds sweep points, not prediction points
    # (the smoke demo re-ran SmolLM2's whole weight-importance stage for it, 170 s)
    changed = changed_after(esa_env, "gaussian: [0.1]", "gaussian: [0.1, 0.2]")
    assert "weight_importance" not in {asset for _, asset in changed}
    assert any(asset.startswith("sensitivity|") for _, asset in changed)
    changed = changed_after(esa_env, "gaussian: [0.1, 0.2]", "gaussian: [0.02, 0.1, 0.2]")
    assert {asset for _, asset in changed} >= {"weight_importance"}
