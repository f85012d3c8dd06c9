"""The compression study (issue 13) as one per-model asset: core/compression/study.py does the work.

Settings: the experiment's `compression:` section (core/config.py `Compression`, `ModelPlan.compression` for
the models it lists); other model partitions materialize without rows (metadata says why). The partition hash
comes from core/config.py HASHED_ASSETS["compression"], so editing the section re-runs only this asset.
Relations written (README documents every column): compression_sensitivity, compression_sensitivity_windows
(the `sensitivity` / `sensitivity_windows` columns, kinds quantize/prune/layer_drop), block_influence,
layer_drop_agreement, compression_recipe.
"""

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from esa_pipeline.core.config import ASSET_RELATIONS, ExperimentConfig, select_layers
from esa_pipeline.core.storage import Store
from esa_pipeline.defs.common import (
    PER_MODEL_ON_GPU,
    current_model_rows,
    model_step,
    number,
    table_preview,
)
from esa_pipeline.defs.loaded import baseline_result, forget_models
from esa_pipeline.defs.model_assets import baseline
from esa_pipeline.defs.resources import ExperimentResource, StoreResource

# study output key -> stored relation (the same relations as ASSET_RELATIONS["compression"])
COMPRESSION_RELATIONS = dict(zip(
    ("sensitivity", "sensitivity_windows", "block_influence", "layer_drop_agreement", "compression_recipe"),
    ASSET_RELATIONS["compression"], strict=True,
))


def compression_rows(store: Store, relation: str, cfg: ExperimentConfig) -> pd.DataFrame:
    """Current rows of `relation` for the studied models (raises FileNotFoundError when there are none)."""
    models = cfg.compression.models if cfg.compression is not None else []
    frames = [f for f in (current_model_rows(store, cfg, m, relation) for m in models) if not f.empty]
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

    step = model_step(context.partition_key, experiment, store, "compression")
    section = step.plan.compression
    if section is None:
        why = f"{step.model} is not in the experiment's compression.models (or there is no compression section)"
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
    counts = {relation: step.write(relation, out[key]) for key, relation in COMPRESSION_RELATIONS.items()}
    recipe = out["compression_recipe"]
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash, **{f"rows_{k}": v for k, v in counts.items()},
            "recipes": table_preview(recipe, ["kind", "allocation", "budget", "achieved", "predicted_delta_nll",
                                              "measured_delta_nll", "additivity_ratio", "ratio_ci_low",
                                              "ratio_ci_high"]),
            "block_influence_vs_layer_drop": table_preview(out["layer_drop_agreement"],
                                                           ["measure", "spearman_rho", "p_value", "n_layers"]),
            "max_quantize_delta_nll": number(out["sensitivity"].query("kind == 'quantize'")["delta_nll"].max()),
        },  # fmt: skip
        check_results=[AssetCheckResult(check_name="compression_restored", passed=restored)],
    )
