"""Per-model assets: the model card and the unperturbed baseline every sweep is compared against."""


import time

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from esa_pipeline.core.config import components_for_architecture
from esa_pipeline.core.evaluation.sanity import PLAUSIBLE_TOKEN_PPL, baseline_problems
from esa_pipeline.defs.common import (
    EAGER,
    PER_MODEL_ON_GPU,
    eager_on_own_version,
    model_step,
    number,
    table_preview,
)
from esa_pipeline.defs.loaded import baseline_result, loaded_model
from esa_pipeline.defs.partitions import model_partitions
from esa_pipeline.defs.resources import ExperimentResource, StoreResource
from esa_pipeline.defs.sources import baseline_config, experiment_config

# The baseline is deterministic: the same settings and code reproduce it to float precision, so a change
# beyond this relative tolerance means the model, data or code changed underneath.
REGRESSION_RTOL = 0.01
ZERO_SHOT_COLUMNS = ["model", "task", "metric", "value", "stderr", "n_items", "num_fewshot", "random_weights"]


@asset(
    **PER_MODEL_ON_GPU,
    automation_condition=EAGER,
    deps=[experiment_config],
    group_name="models",
    description="Loads the model once and records its card: architecture, layers, parameters (total/active).",
)
def model_card(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    step = model_step(context.partition_key, experiment, store, "model_card")
    model, plan = step.model, step.plan
    lm = loaded_model(plan)
    spec = lm.spec
    # Known for sure now that the model is loaded (a hub model's layout may not have been before).
    available = components_for_architecture(spec.architecture, plan.adapter) or []
    from esa_pipeline.core.models.adapters import adapter_for

    lacking = adapter_for(lm.model, plan.adapter).not_applicable()
    not_applicable = [c for c in plan.components if c not in available]
    row = {
        **spec.to_row(),
        "model": model,
        "requested_source": plan.source,
        "load_s": lm.load_s,
        "components_swept": ";".join(c for c in plan.components if c in available),
        "components_not_applicable": ";".join(not_applicable),
        # Every role the family lacks, with why (recorded, never silently skipped): "role: reason; ...".
        "roles_not_applicable": "; ".join(f"{role}: {why}" for role, why in lacking.items()),
    }
    # Typed explicitly: an all-NULL column (no hf_id, no sliding window) would otherwise be stored untyped.
    card = pd.DataFrame([row]).astype(
        {"hf_id": "string", "revision": "string", "sliding_window": "Int64", "n_experts": "Int64",
         "experts_per_token": "Int64", "n_shared_experts": "Int64"}
    )  # fmt: skip
    rows = step.write("models", card)
    if not_applicable:
        context.log.info(f"{model}: not applicable to {spec.architecture}: {', '.join(not_applicable)}")
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": rows,
            "architecture": spec.architecture,
            "n_layers": spec.n_layers,
            "params_total": spec.params_total,
            "params_active": spec.params_active,
            "random_weights": spec.random_weights,
            "tied_embeddings": spec.tied_embeddings,
            "components_not_applicable": ", ".join(not_applicable) or "none",
            "load_s": number(lm.load_s),
        }
    )


@asset(
    **PER_MODEL_ON_GPU,
    automation_condition=eager_on_own_version("model_card"),
    deps=[model_card, baseline_config],
    group_name="models",
    check_specs=[
        # partitioned like the asset: one model's failed baseline blocks only that model's downstream assets
        AssetCheckSpec("baseline_sanity", asset="baseline", blocking=True, partitions_def=model_partitions,
                       description="Rows present, no sanity flags, token PPL plausible (random-weight models exempt)"),
        AssetCheckSpec("baseline_regression", asset="baseline",
                       description="Token PPL within 1% of the previous materialization of the same windows"),
    ],  # fmt: skip
    description="Unperturbed perplexity per dataset and window (+ per-window NLL), zero-shot scores, tok/s, memory.",
)
def baseline(context: AssetExecutionContext, experiment: ExperimentResource, store: StoreResource) -> MaterializeResult:
    step = model_step(context.partition_key, experiment, store, "baseline")
    model, plan = step.model, step.plan
    previous = step.store.read("baselines", model) if step.store.has("baselines", model) else None

    lm = loaded_model(plan)
    rows, windows = [], []
    for dataset in plan.datasets:
        result = baseline_result(plan, dataset)
        if dataset == plan.sweep_dataset:  # before any sweep point is measured on it
            plan.adaptive.check_windows(result.n_windows, file=experiment.file(), model=model,
                                        budget=f"{result.n_tokens} tokens of {dataset}, window {plan.window}")
        context.log.info(
            f"{model} on {dataset}: token PPL {result.token_ppl:.3f} over {result.n_tokens} tokens "
            f"({result.tokens_per_s:.0f} tok/s)"
        )
        rows.append(result.to_row())
        windows.append(result.window_rows())
    baselines = pd.DataFrame(rows)  # keyed by the partition's model name when written
    zero_shot_rows = _zero_shot(context, lm, plan)

    n_windows = step.write("baseline_windows", pd.concat(windows, ignore_index=True))
    n_zero_shot = step.write("zero_shot", zero_shot_rows)
    step.write("baselines", baselines)

    headline = baselines.iloc[0]
    return MaterializeResult(
        metadata={
            "config_hash": step.config_hash,
            "rows": len(baselines),
            "window_rows": n_windows,
            "zero_shot_rows": n_zero_shot,
            "token_ppl": number(headline["token_ppl"]),
            "dataset": str(headline["dataset"]),
            "tokens_per_s": number(headline["tokens_per_s"]),
            "peak_mem_bytes": int(headline["peak_mem_bytes"]),
            "random_weights": bool(lm.spec.random_weights),
            "baselines": table_preview(baselines, ["dataset", "window_tokens", "n_tokens", "token_ppl", "word_ppl",
                                                   "byte_ppl", "token_accuracy", "tokens_per_s", "flags"]),
            "zero_shot": table_preview(zero_shot_rows, ["task", "metric", "value", "stderr", "n_items"]),
        },  # fmt: skip
        check_results=[
            sanity_check(baselines, random_weights=bool(lm.spec.random_weights)),
            regression_check(baselines, previous),
        ],
    )


def _zero_shot(context: AssetExecutionContext, lm, plan) -> pd.DataFrame:
    if not plan.zero_shot.tasks:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in ZERO_SHOT_COLUMNS})
    from esa_pipeline.core.evaluation.zeroshot import zero_shot

    started = time.perf_counter()
    rows = zero_shot(lm, list(plan.zero_shot.tasks), limit=plan.zero_shot.limit,
                     num_fewshot=plan.zero_shot.num_fewshot, batch_size=plan.batch_size)  # fmt: skip
    context.log.info(f"{plan.model}: zero-shot {', '.join(plan.zero_shot.tasks)} in {time.perf_counter() - started:.1f}s")
    return rows


def sanity_check(baselines: pd.DataFrame, *, random_weights: bool) -> AssetCheckResult:
    """Blocking: an implausible baseline would make every ratio against it meaningless."""
    low, high = PLAUSIBLE_TOKEN_PPL
    problems = baseline_problems(baselines, random_weights=random_weights)
    return AssetCheckResult(
        check_name="baseline_sanity",
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "problems": "; ".join(problems) or "none",
            "plausibility_range": f"[{low}, {high}]"
            + (" (exempt: random weights, plumbing only — not science)" if random_weights else ""),
            "random_weights": random_weights,
        },
    )


def regression_check(baselines: pd.DataFrame, previous: pd.DataFrame | None) -> AssetCheckResult:
    """Warn when the same (dataset, window_tokens, token count) gives a different PPL than last time."""
    if previous is None or previous.empty:
        return AssetCheckResult(check_name="baseline_regression", passed=True,
                                metadata={"compared": "no previous materialization"})  # fmt: skip
    keys = ["dataset", "window_tokens", "n_tokens"]
    joined = baselines.merge(previous, on=keys, suffixes=("", "_previous"))
    joined["relative_change"] = (joined["token_ppl"] / joined["token_ppl_previous"] - 1).abs()
    changed = joined.loc[~(joined["relative_change"] <= REGRESSION_RTOL)]
    return AssetCheckResult(
        check_name="baseline_regression",
        passed=changed.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "compared_rows": len(joined),
            "changed_rows": len(changed),
            "max_relative_change": number(joined["relative_change"].max()) if len(joined) else None,
            "previous_code_version": str(previous["code_version"].iloc[0]) if "code_version" in previous else "?",
            "comparison": MetadataValue.md(
                joined[[*keys, "token_ppl_previous", "token_ppl", "relative_change"]].to_markdown(index=False)
            ),
        },
    )
