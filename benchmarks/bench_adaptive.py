"""Fixed token budget vs adaptive budget (anytime-valid confidence sequences), side by side, in one run.

    python benchmarks/bench_adaptive.py [--model smollm2-135m] [--layer-stride 1] [--tokens 6400] [--window 128]
                                        [--components attention.query ffn.down norm.attn_in]
                                        [--strengths 0.001 0.01 0.05 0.1 0.2] [--seed 1337]

Defaults are issue 14's grid: all layers x {attention.query, ffn.down, norm.attn_in} x σ ∈ {0.001, 0.01, 0.05,
0.1, 0.2}, one seed, on the bundled corpus (25 documents; `--tokens` / `--window` windows sampled across them).
Both sweeps share one baseline and one prefix cache; their points are interleaved (fixed then adaptive for each
spec) so load from other processes hits them alike. Printed:
- wall time of each sweep and the ratio; tokens per point (median and quartiles) under the adaptive rule;
- agreement of the significant / not decisions: fixed = document-clustered z-test of ΔNLL ≠ 0 at 5 % over all
  windows (the `ppl_ratio_se` delta method); adaptive = the confidence sequence excludes 0 when the point stopped;
- Spearman correlation of the layer rankings (by ΔNLL) per (component, σ), and the largest |ΔNLL| difference;
- the false-stop rate of the rule on simulated null streams (true mean 0), checked after every document: ≤ α.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from esa_pipeline.core.evaluation.paired import evaluate_against  # noqa: E402
from esa_pipeline.core.evaluation.perplexity import perplexity  # noqa: E402
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache  # noqa: E402
from esa_pipeline.core.evaluation.sequential import SequentialRule, simulate_false_stops  # noqa: E402
from esa_pipeline.core.evaluation.text import load_texts  # noqa: E402
from esa_pipeline.core.models.adapters import adapter_for  # noqa: E402
from esa_pipeline.core.models.registry import load_model  # noqa: E402
from esa_pipeline.core.perturbation.perturb import Perturbation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=6400)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layer-stride", type=int, default=1)
    parser.add_argument("--components", nargs="+", default=["attention.query", "ffn.down", "norm.attn_in"])
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.001, 0.01, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    rule = SequentialRule()
    lm = load_model(args.model)
    adapter = adapter_for(lm.model)
    base = perplexity(lm, load_texts("bundled"), window=args.window, max_tokens=args.tokens,
                      batch_size=args.batch_size)  # fmt: skip
    cache = PrefixCache.build(lm, base, adapter)
    layers = sorted(set(range(0, adapter.num_layers, args.layer_stride)) | {adapter.num_layers - 1})
    print(f"{args.model}: {base.n_tokens} tokens in {base.n_windows} windows of {base.n_documents} documents; "
          f"{len(layers)} layers x {len(args.components)} components x {len(args.strengths)} strengths; {rule}")  # fmt: skip

    rows = []
    time_fixed = time_adaptive = 0.0
    for layer in layers:
        for component in args.components:
            for strength in args.strengths:
                p = Perturbation(kind="gaussian", component=component, layer=layer, strength=strength, seed=args.seed)
                started = time.perf_counter()
                fixed = evaluate_against(lm, base, p, adapter=adapter, cache=cache)
                time_fixed += time.perf_counter() - started
                started = time.perf_counter()
                adaptive = evaluate_against(lm, base, p, adapter=adapter, cache=cache, rule=rule)
                time_adaptive += time.perf_counter() - started
                se = fixed.ppl_ratio_se / fixed.ppl_ratio if fixed.ppl_ratio else math.nan  # SE of ΔNLL
                rows.append({
                    "component": component, "layer": layer, "strength": strength,
                    "fixed_delta": fixed.delta_nll, "adaptive_delta": adaptive.delta_nll,
                    "fixed_significant": bool(abs(fixed.delta_nll) > 1.96 * se) if se == se else None,
                    "adaptive_significant": bool(adaptive.cs_lower > 0 or adaptive.cs_upper < 0),
                    "tokens": adaptive.n_tokens, "stop_reason": adaptive.stop_reason,
                })  # fmt: skip
    frame = pd.DataFrame(rows)

    print(f"\n{'':44}{'fixed':>12}{'adaptive':>12}{'ratio':>9}")
    print(f"{'sweep wall time (s)':44}{time_fixed:12.1f}{time_adaptive:12.1f}{time_adaptive / time_fixed:9.3f}")
    q = frame["tokens"].quantile([0.25, 0.5, 0.75])
    print(f"{'tokens per point (median)':44}{base.n_tokens:12d}{q[0.5]:12.0f}{q[0.5] / base.n_tokens:9.3f}")
    print(f"{'tokens per point (quartiles)':44}{'':12}{f'{q[0.25]:.0f}-{q[0.75]:.0f}':>12}")
    print("stop reasons: " + ", ".join(f"{k} {v}" for k, v in frame["stop_reason"].value_counts().items()))
    decided = frame.dropna(subset=["fixed_significant"])
    agreement = (decided["fixed_significant"] == decided["adaptive_significant"]).mean()
    print(f"{'significant/not decisions agree':44}{agreement:12.3f}   ({len(decided)} points; target ≥ 0.95)")
    rhos = []
    for (component, strength), cell in frame.groupby(["component", "strength"]):
        if len(cell) >= 3:
            rho = stats.spearmanr(cell["fixed_delta"], cell["adaptive_delta"]).statistic
            rhos.append(rho)
            print(f"  layer ranking Spearman {component:18} σ={strength:<6} {rho:6.3f}")
    if rhos:
        print(f"{'layer-ranking Spearman (min / median)':44}{min(rhos):12.3f}{float(np.median(rhos)):12.3f}"
              "   (target ≥ 0.95)")  # fmt: skip
    print(f"{'largest |ΔNLL difference| (nats/token)':44}{(frame['fixed_delta'] - frame['adaptive_delta']).abs().max():12.2e}")
    null = simulate_false_stops(rule, n_streams=2000, max_units=200, seed=0)
    print(f"{'false-stop rate on simulated nulls':44}{null:12.4f}   (α = {rule.alpha})")


if __name__ == "__main__":
    main()
