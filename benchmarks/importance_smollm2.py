"""Weight importance on SmolLM2-135M: where the important weights sit, super weights, causal validation and
the small-σ prediction check. One reproducible run (not a test); prints tables and writes CSVs.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/importance_smollm2.py \
        --layers 0,11,29 --max-tokens 1024 --out data/reports/importance_smollm2
"""

from __future__ import annotations

import argparse
import pathlib
import time

import pandas as pd
import torch

from esa_pipeline.core.evaluation.paired import evaluate_against
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.importance.metrics import METRICS, importance_scores, top_k
from esa_pipeline.core.importance.prediction import predicted_delta_nll, prediction_check
from esa_pipeline.core.importance.super_weights import find_super_weights
from esa_pipeline.core.importance.validation import (
    halves,
    metric_overlap,
    stability_overlap,
    validate_importance,
)
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.models.registry import load_model
from esa_pipeline.core.perturbation.perturb import Perturbation

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 20)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="0,11,29")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--hutchinson-samples", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=1000, help="k for component shares and overlaps")
    ap.add_argument("--sigmas", default="0.02,0.05")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--prediction-components", default="attention.value,attention.output,ffn.up,ffn.down")
    ap.add_argument("--validation-groups", default="ffn.down:11,attention.output:0")
    ap.add_argument("--out", default="data/reports/importance_smollm2")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    layers, seeds, sigmas = _ints(args.layers), _ints(args.seeds), _floats(args.sigmas)

    t = time.perf_counter()
    lm = load_model(args.model, dtype="float32")  # small-σ effects are below bf16 resolution
    adapter = adapter_for(lm.model)
    base = perplexity(lm, load_texts("bundled"), window=args.window, max_tokens=args.max_tokens)
    print(f"# {args.model}: token PPL {base.token_ppl:.2f} over {base.n_tokens} tokens in {base.n_windows} "
          f"windows ({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    result = importance_scores(lm, adapter, base, METRICS, layers=layers,
                               hutchinson_samples=args.hutchinson_samples)
    print(f"\n## importance: {len(result.groups)} groups x {len(METRICS)} metrics "
          f"({time.perf_counter() - t:.1f}s); notes: {result.notes or 'none'}")
    glob = top_k(result, args.top_k, "global")
    glob.to_csv(out / "weight_importance_global.csv", index=False)
    top_k(result, 10, "layer").to_csv(out / "weight_importance_layer.csv", index=False)
    print("\n### global top-5 per metric")
    print(glob[glob["rank"] <= 5][["metric", "rank", "component", "layer", "row", "col", "score"]]
          .to_string(index=False))
    print(f"\n### share of each metric's global top-{args.top_k} by component")
    print(pd.crosstab(glob["component"], glob["metric"], normalize="columns").round(3).to_string())
    print(f"\n### share of each metric's global top-{args.top_k} by layer")
    print(pd.crosstab(glob["layer"], glob["metric"], normalize="columns").round(3).to_string())

    overlap = metric_overlap(result, args.top_k)
    overlap.to_csv(out / "metric_overlap.csv", index=False)
    print(f"\n### Jaccard of per-(component, layer) top-{args.top_k} between metrics (mean over groups)")
    print(overlap.groupby(["metric_a", "metric_b"])["jaccard"].mean().round(3).to_string())
    t = time.perf_counter()
    first, second = halves(base)
    cheap = ("grad_x_weight", "grad_sq", "activation")
    half_a = importance_scores(lm, adapter, first, cheap, layers=layers)
    half_b = importance_scores(lm, adapter, second, cheap, layers=layers)
    stability = stability_overlap(half_a, half_b, args.top_k, source_a="half1", source_b="half2")
    stability.to_csv(out / "stability_overlap.csv", index=False)
    print(f"\n### Jaccard of top-{args.top_k} between data halves ({time.perf_counter() - t:.1f}s)")
    print(stability.groupby("metric_a")["jaccard"].mean().round(3).to_string())

    t = time.perf_counter()
    supers = find_super_weights(lm, base, all_layers=True)
    supers.to_csv(out / "super_weights_all_layers.csv", index=False)
    print(f"\n## super-weight scan ({time.perf_counter() - t:.1f}s): top layers by spike ratio")
    print(supers.head(6).to_string(index=False))
    cache = PrefixCache.build(lm, base, adapter)
    print(f"prefix cache enabled: {cache.enabled}")
    for sw in supers[supers["spike_ratio"] >= 10].itertuples():
        numel = lm.model.get_parameter(sw.param_name).numel()
        one_hot = torch.zeros(lm.model.get_parameter(sw.param_name).shape)
        one_hot[sw.row, sw.col] = 1.0
        hit = evaluate_against(lm, base, Perturbation("zero", "ffn.down", sw.layer, 1 / numel, 0, selection="top"),
                               cache=cache, scores=[one_hot])
        rand = [evaluate_against(lm, base, Perturbation("zero", "ffn.down", sw.layer, 1 / numel, s),
                                 cache=cache).delta_nll for s in range(3)]
        print(f"zero W[{sw.row},{sw.col}] of layer {sw.layer} (={sw.weight_value:+.3f}): ΔNLL {hit.delta_nll:+.4f} "
              f"(PPL x{hit.ppl_ratio:.3f}); zero one random weight of that matrix: ΔNLL "
              f"{', '.join(f'{d:+.5f}' for d in rand)}")

    t = time.perf_counter()
    groups = [(c, int(layer)) for c, layer in (g.split(":") for g in args.validation_groups.split(","))]
    valid = validate_importance(lm, base, result, kinds=("zero",), fractions=(0.001,), seeds=seeds[:2],
                                groups=groups, cache=cache)
    valid.to_csv(out / "importance_validation.csv", index=False)
    print(f"\n## causal validation: zero 0.1% of the slice ({time.perf_counter() - t:.1f}s)")
    print(valid.pivot_table(index=["component", "layer", "metric"], columns="selection", values="delta_nll",
                            aggfunc="mean").round(5).to_string())

    t = time.perf_counter()
    pred_groups = [(c, layer) for c in args.prediction_components.split(",") for layer in layers]
    checks_df = prediction_check(lm, base, result, sigmas, seeds=seeds, groups=pred_groups, cache=cache)
    # the measured values do not depend on the curvature: add the Hessian (Hutchinson) prediction beside
    checks_df["predicted_hutchinson"] = [
        predicted_delta_nll(lm, result, r.component, r.layer, r.strength, curvature="hutchinson")
        for r in checks_df.itertuples()]
    checks_df["ratio_hutchinson"] = checks_df["measured_delta_nll"] / checks_df["predicted_hutchinson"]
    checks_df.to_csv(out / "prediction_check.csv", index=False)
    print(f"\n## small-σ prediction check, measured = mean of {len(seeds)} seeds ({time.perf_counter() - t:.1f}s)")
    print(checks_df.drop(columns="model").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for strength, d in checks_df.groupby("strength"):
        print(f"sigma {strength}: spearman(measured, predicted Fisher) = "
              f"{d['measured_delta_nll'].corr(d['predicted_delta_nll'], method='spearman'):.2f}, "
              f"(Hutchinson) = {d['measured_delta_nll'].corr(d['predicted_hutchinson'], method='spearman'):.2f}")
    print(f"\nCSV files in {out}/")


if __name__ == "__main__":
    main()
