"""The compression study (issue 13) as one per-model asset: core/compression/study.py does the work.

Settings: the experiment's `compression:` section (core/config.py `Compression`), for the models it lists;
other model partitions materialize without rows (metadata says why). Rows are hashed by `compression_hash`
(the model's plan + that section), so editing the section re-runs only this asset and never the sweeps.
Relations written (README documents every column): compression_sensitivity, compression_sensitivity_windows
(the `sensitivity` / `sensitivity_windows` columns, kinds quantize/prune/layer_drop), block_influence,
layer_drop_agreement, compression_recipe.
"""

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from esa_pipeline.core.config import ExperimentConfig, compression_hash, select_layers
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.common import (
    PER_MODEL_ON_GPU,
    model_step,
    number,
    store_rows,
    table_preview,
    with_model,
)
from esa_pipeline.defs.loaded import baseline_result, forget_models
from esa_pipeline.defs.model_assets import baseline
from esa_pipeline.defs.resources import ExperimentResource, StoreResource

# study output key -> stored relation
COMPRESSION_RELATIONS = {
    "sensitivity": "compression_sensitivity",
    "sensitivity_windows": "compression_sensitivity_windows",
    "block_influence": "block_influence",
    "layer_drop_agreement": "layer_drop_agreement",
    "compression_recipe": "compression_recipe",
}


def compression_rows(store: Store, relation: str, cfg: ExperimentConfig) -> pd.DataFrame:
    """Rows of the studied models under their current compression settings (the report reads these)."""
    if cfg.compression is None or not store.has(relation):
        raise FileNotFoundError(f"no {relation} rows: add a `compression:` section and materialize `compression`")
    frames = [store.read(relation, model=m, config_hash=compression_hash(cfg, m)) for m in cfg.compression.models]
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise FileNotFoundError(f"no {relation} rows under the current compression settings")
    return pd.concat(frames, ignore_index=True)


@asset(
    **PER_MODEL_ON_GPU,
    deps=[baseline],
    group_name="compression",
    check_specs=[AssetCheckSpec("compression_restored", asset="compression", blocking=True,
                                description="Every point and every whole recipe restored the weights bit-exactly")],
    description="quantize / prune / layer_drop sweeps, Block Influence, and bit / sparsity recipes applied whole "
    "(predicted vs measured ΔNLL) for the models of the `compression:` section.",
)  # fmt: skip
def compression(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    from esa_pipeline.core.compression.study import compression_study

    step = model_step(context.partition_key, experiment, store)
    cfg = experiment.load()
    section = cfg.compression
    if section is None or step.model not in section.models:
        why = "no compression section" if section is None else f"{step.model} is not in compression.models"
        return MaterializeResult(metadata={"skipped": why},
                                 check_results=[AssetCheckResult(check_name="compression_restored", passed=True,
                                                                 metadata={"skipped": why})])  # fmt: skip
    lm, adapter = step.load()
    plan = step.plan
    base = baseline_result(plan, plan.sweep_dataset, section.token_budget)
    layers = select_layers(section.layers, adapter.num_layers)
    prune_scores = None
    if section.sparsities and section.prune_method == "wanda":
        from esa_pipeline.core.compression.study import matrix_components
        from esa_pipeline.core.importance.metrics import importance_scores

        scored = importance_scores(lm, adapter, base, ["activation"], layers=layers,
                                   components=section.components or matrix_components(adapter))  # fmt: skip
        prune_scores = lambda p: scored.scores_for("activation", p.component, p.layer)  # noqa: E731
    out = compression_study(
        lm, base, layers=layers, components=section.components, bits=section.bits, scheme=section.scheme,
        group_size=section.group_size, sparsities=section.sparsities, prune_method=section.prune_method,
        bit_budget=section.bit_budget, sparsity_target=section.sparsity_target, spans=section.spans,
        prune_scores=prune_scores, log=lambda line: context.log.info(f"{step.model}: {line}"),
    )  # fmt: skip
    restored = bool(out["sensitivity"]["restored"].all() and out["compression_recipe"]["restored"].all())
    if not restored:
        forget_models()  # the cached weights are suspect
    config_hash = compression_hash(cfg, step.model)
    counts = {relation: store_rows(step.store, relation, step.model, with_model(out[key], step.model), config_hash)
              for key, relation in COMPRESSION_RELATIONS.items()}  # fmt: skip
    recipe = out["compression_recipe"]
    return MaterializeResult(
        metadata={
            "config_hash": config_hash, **{f"rows_{k}": v for k, v in counts.items()},
            "recipes": table_preview(recipe, ["kind", "allocation", "budget", "achieved", "predicted_delta_nll",
                                              "measured_delta_nll", "additivity_ratio", "ratio_ci_low",
                                              "ratio_ci_high"]),
            "block_influence_vs_layer_drop": table_preview(out["layer_drop_agreement"],
                                                           ["measure", "spearman_rho", "p_value", "n_layers"]),
            "max_quantize_delta_nll": number(out["sensitivity"].query("kind == 'quantize'")["delta_nll"].max()),
        },  # fmt: skip
        check_results=[AssetCheckResult(check_name="compression_restored", passed=restored)],
    )
