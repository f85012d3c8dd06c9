"""Fixed token budget vs adaptive budget (anytime-valid confidence sequences), side by side, in one run.

    python benchmarks/bench_adaptive.py [--model smollm2-135m] [--layer-stride 1] [--tokens 6400] [--window 128]
                                        [--components attention.query ffn.down norm.attn_in]
                                        [--strengths 0.001 0.01 0.05 0.1 0.2] [--seed 1337] [--csv PATH]
    python benchmarks/bench_adaptive.py --summarise PATH     # the table again from a (possibly partial) CSV

Defaults are issue 14's grid: all layers x {attention.query, ffn.down, norm.attn_in} x σ ∈ {0.001, 0.01, 0.05,
0.1, 0.2}, one seed, on the bundled corpus (25 documents; `--tokens` / `--window` windows sampled across them).
Both sweeps share one baseline; the fixed points use its prefix cache, the adaptive points the prefix cache of its
visit order (`adaptive.visit_ordered`: the windows in a seeded random order, batches of consecutive windows of it).
Their points are interleaved (fixed then adaptive for each spec) so load from other processes hits them alike.
Printed:
- wall time of each sweep and the ratio; tokens per point (median and quartiles) under the adaptive rule;
- agreement of the significant / not decisions with the fixed budget's: fixed = the pipeline's document-clustered
  t-test of ΔNLL ≠ 0 at 5 % (`analysis.draws.clustered_ratio_test`, the conditional test of `significance`) over
  all windows; adaptive (i) = the sequence's own decision (it excludes 0 when the point stopped), adaptive (ii) =
  the same clustered t-test on the windows the adaptive point scored (what the pipeline reports downstream);
- Spearman correlation of the layer rankings (by ΔNLL) per (component, σ), and the largest |ΔNLL| difference;
- the false-stop rate of the rule on simulated null streams (true mean 0), checked after every window: ≤ α;
- the permutation check: each fixed point's real per-window observations replayed in 2000 random visit orders,
  checked after every batch as the rule does; the fraction of orders on which the sequence ever excluded the
  full-budget mean (the time-uniform guarantee: ≤ α is the target), excluded it when the rule stopped, and
  missed it by more than abs_tolerance (`sequential.wor_stop_errors`).
One CSV row per point is appended as it is measured (`--csv`), so an interrupted run can still be summarised.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from esa_pipeline.core.analysis.draws import clustered_ratio_test  # noqa: E402
from esa_pipeline.core.evaluation.adaptive import visit_ordered  # noqa: E402
from esa_pipeline.core.evaluation.paired import PairedResult, evaluate_against  # noqa: E402
from esa_pipeline.core.evaluation.perplexity import perplexity  # noqa: E402
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache  # noqa: E402
from esa_pipeline.core.evaluation.sequential import (  # noqa: E402
    SequentialRule,
    random_orders,
    simulate_false_stops,
    window_observations,
    wor_stop_errors,
)
from esa_pipeline.core.evaluation.text import load_texts  # noqa: E402
from esa_pipeline.core.models.adapters import adapter_for  # noqa: E402
from esa_pipeline.core.models.registry import load_model  # noqa: E402
from esa_pipeline.core.perturbation.perturb import Perturbation  # noqa: E402


def spread_order(layers: list[int]) -> list[int]:
    """`layers` in bit-reversed index order (0, 16, 8, 24, 4, ... for 32): any prefix of a run spans the depth
    evenly, so an interrupted run still compares layer rankings across the whole model."""
    bits = max(1, (len(layers) - 1).bit_length())
    return [layers[i] for i in sorted(range(len(layers)), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))]


def clustered_significant(result: PairedResult, alpha: float = 0.05) -> bool | None:
    """The pipeline's conditional test on a point's scored windows: document-clustered t-test of ΔNLL ≠ 0
    (None when it cannot be tested: fewer than two documents, or a non-finite loss)."""
    w = result.windows
    per_doc = w.groupby("doc_id", as_index=False).agg(d=("delta_nll_sum", "sum"), t=("n_tokens", "sum"))
    test = clustered_ratio_test(per_doc.assign(_cell=0), alpha).iloc[0]
    return None if not np.isfinite(test["p_value"]) else bool(test["p_value"] < alpha)


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
    parser.add_argument("--csv", default="/tmp/bench_adaptive_points.csv", help="per-point rows, appended live")
    parser.add_argument("--summarise", metavar="CSV", help="print the table from a CSV of an earlier run")
    parser.add_argument("--resume", action="store_true", help="keep --csv's rows and measure only the missing points")
    args = parser.parse_args()
    rule = SequentialRule()
    if args.summarise:
        summarise(pd.read_csv(args.summarise), rule)
        return

    lm = load_model(args.model)
    adapter = adapter_for(lm.model)
    base = perplexity(lm, load_texts("bundled"), window=args.window, max_tokens=args.tokens,
                      batch_size=args.batch_size)  # fmt: skip
    cache = PrefixCache.build(lm, base, adapter)
    visit_cache = PrefixCache.build(lm, visit_ordered(base), adapter)
    layers = sorted(set(range(0, adapter.num_layers, args.layer_stride)) | {adapter.num_layers - 1})
    print(f"{args.model}: {base.n_tokens} tokens in {base.n_windows} windows of {base.n_documents} documents, "
          f"batches of {args.batch_size}; {len(layers)} layers x {len(args.components)} components x "
          f"{len(args.strengths)} strengths; {rule}", flush=True)  # fmt: skip

    mean_tokens = base.n_tokens / base.n_windows
    done = set()
    if os.path.exists(args.csv) and args.resume:
        kept = pd.read_csv(args.csv)
        # every setting that changes a point's numbers must match, or the summary would mix two experiments
        wanted = {"model": args.model, "window": args.window, "seed": args.seed, "budget_tokens": base.n_tokens,
                  "batch_size": args.batch_size}  # fmt: skip
        differ = {k: sorted(set(kept[k])) if k in kept else "not recorded" for k, v in wanted.items()
                  if k not in kept or set(kept[k]) != {v}}  # fmt: skip
        if differ:
            raise SystemExit(f"--resume: {args.csv} was measured with other settings {differ}, not {wanted}: "
                             "resume with the same --model/--window/--seed/--tokens/--batch-size, or start a new --csv")
        done = set(zip(kept["component"], kept["layer"], kept["strength"], strict=True))
    elif os.path.exists(args.csv):
        os.remove(args.csv)
    for layer in spread_order(layers):
        for component in args.components:
            for strength in args.strengths:
                if (component, layer, strength) in done:
                    continue
                p = Perturbation(kind="gaussian", component=component, layer=layer, strength=strength, seed=args.seed)
                started = time.perf_counter()
                fixed = evaluate_against(lm, base, p, adapter=adapter, cache=cache)
                time_fixed = time.perf_counter() - started
                started = time.perf_counter()
                adaptive = evaluate_against(lm, base, p, adapter=adapter, cache=visit_cache, rule=rule)
                time_adaptive = time.perf_counter() - started
                row = pd.DataFrame([{
                    "model": args.model, "window": args.window, "seed": args.seed,
                    "component": component, "layer": layer, "strength": strength,
                    "fixed_delta": fixed.delta_nll, "adaptive_delta": adaptive.delta_nll,
                    "fixed_significant": clustered_significant(fixed),
                    "sequence_significant": bool(adaptive.cs_lower > 0 or adaptive.cs_upper < 0),
                    "downstream_significant": clustered_significant(adaptive),
                    "tokens": adaptive.n_tokens, "budget_tokens": base.n_tokens, "stop_reason": adaptive.stop_reason,
                    "time_fixed_s": time_fixed, "time_adaptive_s": time_adaptive, "batch_size": args.batch_size,
                    "window_observations": " ".join(f"{v:.9g}" for v in window_observations(
                        fixed.windows["delta_nll_sum"].tolist(), mean_tokens)),
                }])  # fmt: skip
                row.to_csv(args.csv, mode="a", header=not os.path.exists(args.csv), index=False)
        print(f"layer {layer} done", flush=True)
    print(f"per-point rows (with each fixed point's window observations in window order): {args.csv}")
    summarise(pd.read_csv(args.csv), rule)


def summarise(frame: pd.DataFrame, rule: SequentialRule) -> None:
    """The benchmark table from the per-point rows."""
    budget = int(frame["budget_tokens"].max())
    time_fixed, time_adaptive = frame["time_fixed_s"].sum(), frame["time_adaptive_s"].sum()
    print(f"{len(frame)} points")
    print(f"\n{'':44}{'fixed':>12}{'adaptive':>12}{'ratio':>9}")
    print(f"{'sweep wall time (s)':44}{time_fixed:12.1f}{time_adaptive:12.1f}{time_adaptive / time_fixed:9.3f}")
    q = frame["tokens"].quantile([0.25, 0.5, 0.75])
    print(f"{'tokens per point (median)':44}{budget:12d}{q[0.5]:12.0f}{q[0.5] / budget:9.3f}")
    print(f"{'tokens per point (mean)':44}{budget:12d}{frame['tokens'].mean():12.0f}"
          f"{frame['tokens'].mean() / budget:9.3f}")  # fmt: skip
    print(f"{'tokens per point (quartiles)':44}{'':12}{f'{q[0.25]:.0f}-{q[0.75]:.0f}':>12}")
    print("stop reasons: " + ", ".join(f"{k} {v}" for k, v in frame["stop_reason"].value_counts().items()))
    fixed_sig = frame["fixed_significant"]
    print(f"{'points fixed decides significant':60}{int((fixed_sig == True).sum()):8d} of {len(frame)}")  # noqa: E712
    for column, label in (("sequence_significant", "(i) the sequence's own decision"),
                          ("downstream_significant", "(ii) clustered test on the scored windows")):
        decided = frame.dropna(subset=["fixed_significant", column])
        agree = decided["fixed_significant"].astype(bool) == decided[column].astype(bool)
        lost = int((decided["fixed_significant"].astype(bool) & ~agree).sum())
        print(f"{'agreement with fixed: ' + label:60}{agree.mean():8.3f}   ({len(decided)} points; target ≥ 0.95)")
        print(f"    fixed significant / adaptive not: {lost}, fixed not / adaptive significant: {int((~agree).sum()) - lost}")
        # Rule (b) stops a point once its effect is known to within abs_tolerance, on purpose without testing it:
        # points whose fixed-budget effect is below that tolerance can disagree by design, so show both sides.
        large = decided["fixed_delta"].abs() > rule.abs_tolerance
        for name, part in (("|fixed ΔNLL| > abs_tolerance", large), ("|fixed ΔNLL| <= abs_tolerance", ~large)):
            if part.any():
                print(f"    among points with {name}: {agree[part].mean():.3f} ({int(part.sum())} points)")
    rhos = []
    for (component, strength), cell in frame.groupby(["component", "strength"]):
        if len(cell) >= 3:
            rho = stats.spearmanr(cell["fixed_delta"], cell["adaptive_delta"]).statistic
            rhos.append(rho)
            print(f"  layer ranking Spearman {component:18} σ={strength:<6} {rho:6.3f}")
    if rhos:
        print(f"{'layer-ranking Spearman (min / median)':44}{min(rhos):12.3f}{float(np.median(rhos)):12.3f}"
              "   (target ≥ 0.95)")  # fmt: skip
    diff = (frame["fixed_delta"] - frame["adaptive_delta"]).abs()
    print(f"{'largest |ΔNLL difference| (nats/token)':44}{diff.max():12.2e}")
    null = simulate_false_stops(rule, n_streams=2000, max_units=200, seed=0)
    print(f"{'false-stop rate on simulated nulls':44}{null:12.4f}   (α = {rule.alpha})")
    populations = [np.array([float(v) for v in str(x).split()]) for x in frame["window_observations"]]
    orders = random_orders(len(populations[0]), 2000, seed=0)
    errors = pd.DataFrame([wor_stop_errors(x, orders, rule, batch_size=int(b)) for x, b in
                           zip(populations, frame["batch_size"], strict=True)])  # fmt: skip
    print("permutation check on real windows (2000 random visit orders per fixed point, checked per batch):")
    print(f"    {'':44}{'mean':>9}{'max':>9}{'points > α':>12}")
    for column, label in (("ever", "sequence ever excluded the fixed-budget mean"),
                          ("at_stop", "excluded it when the rule stopped"),
                          ("beyond_tolerance", "... by more than abs_tolerance")):
        rates = errors[column]
        print(f"    {label:44}{rates.mean():9.4f}{rates.max():9.4f}{int((rates > rule.alpha).sum()):8d} of {len(rates)}")
    worst = frame.assign(ever=errors["ever"], at_stop=errors["at_stop"]).nlargest(5, "ever")
    for _, r in worst.iterrows():
        x = populations[r.name]
        print(f"    worst: {r['component']:18} layer {r['layer']:>2} σ={r['strength']:<6} ΔNLL {r['fixed_delta']:.2e}: "
              f"ever {r['ever']:.4f}, at stop {r['at_stop']:.4f} (largest window |y - mean| / sd = "
              f"{np.abs(x - x.mean()).max() / x.std(ddof=1):.1f})")

if __name__ == "__main__":
    main()
