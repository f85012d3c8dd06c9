"""Every adapter family's tiny model runs through `esa materialize` (model card, baseline, one sweep partition).

One materialize call covers all families (one experiment, one Dagster instance); the assertions are
parametrized per family.
"""

import pandas as pd
import pytest

from esa_pipeline.core.storage import Store
from esa_pipeline.defs.runner import materialize
from esa_pipeline_tests.conftest import ALL_TINY

FAMILIES = ALL_TINY[5:]  # the original five run in test_materialize.py and in the demo
PER_EXPERT = {"tiny-qwen2-moe": "{experts: [0, 3]}"}
EXPERIMENT = """\
protocol: smoke
datasets: [bundled]
window: 16
token_budget: 32
batch_size: 2
seeds: [1]
strengths: {gaussian: [0.1]}
components: [ffn.down]
layers: [1]
models:
""" + "".join(f"  {model}: {PER_EXPERT.get(model, '{}')}\n" for model in FAMILIES)


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    experiment = root / "families.yaml"
    experiment.write_text(EXPERIMENT)
    (root / "dagster_home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESA_EXPERIMENT", str(experiment))
        mp.setenv("ESA_STORE_DIR", str(root / "store"))
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        for var in ("ESA_DB_PATH", "ESA_EXECUTOR", "ESA_RUNNER_EXECUTOR"):
            mp.delenv(var, raising=False)
        summary = materialize(experiment=str(experiment), select=["sensitivity"], log=lambda line: None)
    return summary, Store(root / "store")


@pytest.mark.parametrize("model", FAMILIES)
def test_a_sweep_runs_end_to_end_on_every_family(materialized, model):
    summary, store = materialized
    assert not [o for o in summary.failed if o.partition and o.partition.startswith(model)], summary.failed
    rows = store.read("sensitivity", f"{model}|ffn.down__1")
    experts = sorted(-1 if pd.isna(e) else int(e) for e in rows["expert"])
    assert experts == ([0, 3] if model in PER_EXPERT else [-1])  # -1: all experts at once (expert NULL)
    assert (rows["layer"] == 1).all() and rows["restored"].all() and rows["random_weights"].all()
    assert rows["delta_nll"].notna().all() and (rows["delta_nll"] != 0).all()
    card = store.read("models", model)
    assert card["random_weights"].all() and card["architecture"].iloc[0].endswith(("ForCausalLM", "LMHeadModel"))
    lacking = card["roles_not_applicable"].iloc[0]
    assert ("moe.router: dense model" in lacking) != bool(card["is_moe"].iloc[0]), lacking
    assert rows["also_perturbed"].isna().all()  # ffn.down shares no tensor
