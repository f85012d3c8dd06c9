"""Compression study on one model (issue 13): quantize / prune / layer_drop sweeps, Block Influence, and a
bit / sparsity recipe applied whole against its predicted sum. Prints the headline numbers; writes every
relation as Parquet under --out.

    nice .venv/bin/python benchmarks/compression_study.py --model smollm2-135m --tokens 768 --window 128
"""

from __future__ import annotations

import argparse
import pathlib
import time

from esa_pipeline.core.compression.study import compression_study
from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.evaluation.text import load_texts
from esa_pipeline.core.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--bits", default="3,4,8")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75", help='"" skips pruning')
    parser.add_argument("--bit-budget", type=float, default=4.0)
    parser.add_argument("--sparsity-target", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", default="data/compression_study")
    args = parser.parse_args()
    started = time.perf_counter()
    lm = load_model(args.model, dtype="float32", device="cpu")
    base = perplexity(lm, load_texts("bundled"), window=args.window, max_tokens=args.tokens,
                      batch_size=max(1, args.tokens // args.window))
    print(f"baseline: {base.n_tokens} tokens, {len(base.token_windows)} windows, token PPL {base.token_ppl:.3f}")
    out = compression_study(
        lm, base, bits=tuple(int(b) for b in args.bits.split(",")),
        sparsities=tuple(float(s) for s in args.sparsities.split(",") if s), bit_budget=args.bit_budget,
        sparsity_target=args.sparsity_target, group_size=args.group_size,
        log=lambda line: print(f"[{time.perf_counter() - started:7.1f}s] {line}", flush=True),
    )  # fmt: skip
    target = pathlib.Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    for name, frame in out.items():
        frame.to_parquet(target / f"{name}.parquet")
    sens = out["sensitivity"]
    q3 = sens[(sens["kind"] == "quantize") & (sens["strength"] == min(float(b) for b in args.bits.split(",")))]
    print("\nmost quantization-sensitive (layer, component) at the lowest bit width:")
    print(q3.nlargest(5, "delta_nll")[["layer", "component", "strength", "delta_nll", "kl", "relative_change"]]
          .to_string(index=False))
    print("\nrecipes (measured whole vs predicted sum):")
    cols = ["kind", "allocation", "budget", "achieved", "predicted_delta_nll", "measured_delta_nll", "measured_kl",
            "additivity_ratio", "ratio_ci_low", "ratio_ci_high", "restored", "note"]
    print(out["compression_recipe"][cols].to_string(index=False))
    print("\nBlock Influence vs layer_drop ΔNLL:")
    print(out["layer_drop_agreement"].to_string(index=False))
    drops = sens[sens["kind"] == "layer_drop"].pivot(index="layer", columns="component", values="delta_nll")
    print("\nlayer_drop ΔNLL by layer:\n" + drops.join(out["block_influence"].set_index("layer")[
        ["block_influence", "angular_distance"]]).to_string())
    print(f"\ntotal {time.perf_counter() - started:.0f}s; relations written to {target}/")


if __name__ == "__main__":
    main()
