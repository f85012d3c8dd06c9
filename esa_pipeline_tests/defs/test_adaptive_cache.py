"""With adaptive budgets on, the sweep's shared prefix cache is built from the baseline's visit order, so every
adaptive point replays from it (a cache of the document order would be refused)."""

from esa_pipeline.core import Perturbation
from esa_pipeline.core.config import load_experiment, model_plan
from esa_pipeline.core.evaluation.sweep import run_sweep
from esa_pipeline.defs.loaded import baseline_result, forget_models, loaded_model, prefix_cache
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
