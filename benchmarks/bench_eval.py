"""Cost of one sensitivity point on SmolLM2, every way of computing it, side by side, in one run.

    python benchmarks/bench_eval.py [--model smollm2-135m] [--tokens 2048] [--window 512] [--batch-size 4]
                                    [--dtype float32] [--layer-stride 3] [--repeats 2] [--quick]

`--model gemma3-270m --quick` gives Gemma-3-270M's figures beside SmolLM2's (`--quick` skips the naive and
lm-eval approaches, which reload or copy the model per point).

Every approach scores the same windows (the bundled corpus, `--tokens` tokens in `--window`-token windows)
in the same dtype. Times are medians over `--repeats`, with the approaches interleaved round-robin so that
load from other processes hits them alike. Reported:
- cost per sweep point: prefix cache (averaged over the layers 0, stride, 2*stride, ...), full forward,
  the naive loops (fresh load from the safetensors cache, or deepcopy, then perturb + full forward), and
  one lm-eval `HFLM.loglikelihood_rolling` call per point (HFLM built per point, as a per-point call would);
- evaluation overhead: `perplexity()` vs bare `model(input_ids)` forwards on the same batches;
- peak memory of a sweep vs the baseline evaluation (CUDA max allocated, else the process RSS high-water mark);
- the FLOP-model ideal of the prefix cache: a point in layer L recomputes (N - L) / N of the decoder FLOPs
  plus the head twice (the perturbed log-probs and the baseline's, recomputed from its stored final hidden
  states for the exact full-vocabulary KL); averaged over the measured layers. The head's share of one forward's
  FLOPs is printed: it is what makes big vocabularies (Gemma-3: 262,144 x 640) expensive per point.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from esa_pipeline.core.evaluation.paired import evaluate_against  # noqa: E402
from esa_pipeline.core.evaluation.perplexity import measure_peak_memory, model_device, perplexity  # noqa: E402
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache  # noqa: E402
from esa_pipeline.core.evaluation.sweep import run_sweep  # noqa: E402
from esa_pipeline.core.evaluation.text import load_texts  # noqa: E402
from esa_pipeline.core.models.adapters import adapter_for  # noqa: E402
from esa_pipeline.core.models.registry import load_model  # noqa: E402
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed  # noqa: E402

COMPONENT = "ffn.down"
MIB = 2**20


def flop_shares(model: torch.nn.Module, adapter, window: int) -> tuple[float, float]:
    """(decoder layers' share, head's share) of forward multiply-adds per token.

    Linear layers: one MAC per weight. Attention scores and the weighted sum: 2 * context * hidden MACs per
    token and layer, with the causal mean context (window + 1) / 2. Norms, activations, softmax: ignored.
    """
    config = model.config
    layers = adapter.decoder_layers(model)
    layer_weights = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() >= 2)
    if getattr(config, "num_local_experts", None):  # MoE: only top-k experts run per token
        raise NotImplementedError("the FLOP model here is for dense models")
    attention = len(layers) * 2 * (window + 1) / 2 * config.num_attention_heads * (
        config.hidden_size // config.num_attention_heads)
    head = adapter.lm_head(model).weight.numel()
    total = layer_weights + attention + head
    return (layer_weights + attention) / total, head / total


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layer-stride", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="skip the naive and lm-eval approaches")
    args = parser.parse_args()
    MODEL = args.model  # noqa: N806

    lm = load_model(MODEL, dtype=args.dtype)
    model, adapter = lm.model, adapter_for(lm.model)
    docs = load_texts("bundled")
    n_layers = len(adapter.decoder_layers(model))
    layers = list(range(0, n_layers, args.layer_stride))
    mid = layers[len(layers) // 2]
    print(f"{MODEL} {args.dtype} on {model_device(model)}, torch threads {torch.get_num_threads()}, "
          f"{n_layers} layers; spec gaussian {COMPONENT} sigma 0.1; layers {layers}")

    def spec(layer: int) -> Perturbation:
        return Perturbation("gaussian", COMPONENT, layer, 0.1, 1337)

    # ---- baseline, bare forwards, cache build
    with measure_peak_memory(model_device(model)) as base_peak:
        base = perplexity(lm, docs, window=args.window, max_tokens=args.tokens, batch_size=args.batch_size)
    batches = base.batches()
    print(f"baseline: {base.n_tokens} tokens in {base.n_windows} windows x {args.window}, token PPL "
          f"{base.token_ppl:.2f}, {base.tokens_per_s:.0f} tok/s, flags {base.flags or 'none'}")
    # a sweep's peak includes building its own cache; measured before this script holds a cache of its own
    with measure_peak_memory(model_device(model)) as sweep_peak:
        run_sweep(lm, base, [spec(layer) for layer in layers[:4]], adapter=adapter)
    cache = PrefixCache.build(lm, base, adapter)
    print(f"prefix cache: {cache.captured_bytes / MIB:.1f} MiB captured, built in {cache.build_s:.2f}s")

    def bare_forwards() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b.input_ids.to(model_device(model)))

    def lm_eval_point(p: Perturbation) -> None:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        texts = {}
        for w in base.token_windows:  # the same scored tokens, per document, as text
            texts.setdefault(w.doc_id, []).extend(w.target_ids)
        requests = [Instance("loglikelihood_rolling", {}, (lm.tokenizer.decode(t),), i)
                    for i, t in enumerate(texts.values())]  # fmt: skip
        with perturbed(model, adapter, p), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            harness = HFLM(pretrained=model, tokenizer=lm.tokenizer, max_length=args.window,
                           batch_size=args.batch_size)  # fmt: skip
            harness.loglikelihood_rolling(requests, disable_tqdm=True)

    def naive_load_point(p: Perturbation) -> None:
        fresh = load_model(MODEL, dtype=args.dtype)
        evaluate_against(fresh, base, p, adapter=adapter_for(fresh.model))

    def naive_deepcopy_point(p: Perturbation) -> None:
        clone = copy.deepcopy(lm)
        evaluate_against(clone, base, p, adapter=adapter_for(clone.model))

    costs: dict[str, list[float]] = {k: [] for k in (
        "bare", "perplexity", "prefix", "full", "naive_load", "naive_deepcopy", "lm_eval")}  # fmt: skip
    if args.quick:
        for key in ("naive_load", "naive_deepcopy", "lm_eval"):
            costs[key].append(float("nan"))
    for _ in range(args.repeats):
        costs["bare"].append(timed(bare_forwards))
        costs["perplexity"].append(timed(lambda: perplexity(
            lm, docs, window=args.window, max_tokens=args.tokens, batch_size=args.batch_size)))
        costs["prefix"].append(statistics.mean(
            timed(lambda layer=layer: evaluate_against(lm, base, spec(layer), cache=cache)) for layer in layers))
        costs["full"].append(timed(lambda: evaluate_against(lm, base, spec(mid), adapter=adapter)))
        if args.quick:
            continue
        costs["naive_load"].append(timed(lambda: naive_load_point(spec(mid))))
        costs["naive_deepcopy"].append(timed(lambda: naive_deepcopy_point(spec(mid))))
        costs["lm_eval"].append(timed(lambda: lm_eval_point(spec(mid))))
    median = {k: statistics.median(v) for k, v in costs.items()}

    layer_share, head_share = flop_shares(model, adapter, args.window)
    # a point applies the head twice (perturbed + the baseline's log-probs for exact KL), a full-forward point too
    def point_cost(layer: int) -> float:
        return (layer_share * (n_layers - layer) / n_layers + 2 * head_share) / (layer_share + 2 * head_share)

    ideal = statistics.mean(point_cost(layer) for layer in layers)
    ideal_all = statistics.mean(point_cost(layer) for layer in range(n_layers))

    full = median["full"]
    print(f"\ncost per sweep point ({base.n_tokens} tokens, median of {args.repeats}; ratio to a full-forward point)")
    rows = [
        ("prefix cache (mean over measured layers)", median["prefix"]),
        ("full forward (evaluate_against, no cache)", full),
        ("naive: fresh load from safetensors + perturb + forward", median["naive_load"]),
        ("naive: deepcopy + perturb + forward", median["naive_deepcopy"]),
        ("lm-eval: HFLM + loglikelihood_rolling per point", median["lm_eval"]),
    ]
    print(f"  ({MODEL}: head {head_share:.1%} of one forward's FLOPs; a point's head work, with the baseline's "
          f"log-probs recomputed for exact KL, is {2 * head_share / (layer_share + 2 * head_share):.1%} of a "
          "full-forward point)")
    for label, seconds in rows:
        print(f"  {label:<56} {seconds:8.2f} s   {seconds / full:6.2f}x")
    print(f"\nprefix cache vs FLOP-model ideal: measured {median['prefix'] / full:.3f}x, ideal {ideal:.3f}x "
          f"(head {head_share:.1%} of forward FLOPs; all-layer average ideal {ideal_all:.3f}x) -> "
          f"{median['prefix'] / full / ideal - 1:+.1%} vs ideal (target within 10%)")
    print(f"evaluation overhead: perplexity() {median['perplexity']:.2f} s vs bare model(input_ids) "
          f"{median['bare']:.2f} s -> {median['perplexity'] / median['bare'] - 1:+.1%} (target <= 10%); "
          f"full-forward point vs bare {full / median['bare'] - 1:+.1%}")
    print(f"peak memory ({base_peak.source}): sweep {sweep_peak.peak_bytes / MIB:.0f} MiB vs baseline "
          f"evaluation {base_peak.peak_bytes / MIB:.0f} MiB -> {sweep_peak.peak_bytes / base_peak.peak_bytes:.2f}x "
          f"(cache holds {cache.captured_bytes / MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
