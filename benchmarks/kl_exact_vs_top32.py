"""Exact full-vocabulary KL(baseline || perturbed) against the old top-32 renormalised value, on SmolLM2.

    python benchmarks/kl_exact_vs_top32.py [--tokens 1024] [--window 256]

For three points (gaussian noise in different components and strengths) it prints, per point: `kl` and
`kl_lower_bound_topk` from `evaluate_against` (chunked head, exact), a brute-force KL from the model's own full
logits in fp64, and the value the evaluator stored before issue 10 item 8: both distributions restricted to the
baseline's top-32 tokens and renormalised there (not a bound: mass moving into the tail is ignored).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from esa_pipeline.core.evaluation.paired import evaluate_against  # noqa: E402
from esa_pipeline.core.evaluation.perplexity import perplexity  # noqa: E402
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache  # noqa: E402
from esa_pipeline.core.evaluation.scoring import gather_scored  # noqa: E402
from esa_pipeline.core.evaluation.text import load_texts  # noqa: E402
from esa_pipeline.core.models.adapters import adapter_for  # noqa: E402
from esa_pipeline.core.models.registry import load_model  # noqa: E402
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed  # noqa: E402

POINTS = (
    Perturbation("gaussian", "ffn.down", 15, 0.1, 1337),
    Perturbation("gaussian", "attention.value", 5, 0.5, 1337),
    Perturbation("gaussian", "ffn.up", 25, 1.0, 1337),
)


def brute_force(lm, base, adapter, p: Perturbation, k: int = 32) -> tuple[float, float]:
    """(exact KL, old top-k renormalised KL), token means, from whole fp64 log-softmaxes of the model's logits."""
    exact, old = [], []
    for batch in base.batches():
        with torch.inference_mode():
            p_log = gather_scored(lm.model(input_ids=batch.input_ids).logits, batch).double().log_softmax(-1)
            with perturbed(lm.model, adapter, p):
                q_log = gather_scored(lm.model(input_ids=batch.input_ids).logits, batch).double().log_softmax(-1)
        exact.append((p_log.exp() * (p_log - q_log)).sum(-1))
        top_p, ids = p_log.topk(k, dim=-1)
        top_q = q_log.gather(-1, ids)
        top_p = top_p - top_p.logsumexp(-1, keepdim=True)
        top_q = top_q - top_q.logsumexp(-1, keepdim=True)
        old.append((top_p.exp() * (top_p - top_q)).sum(-1))
    return float(torch.cat(exact).mean()), float(torch.cat(old).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    lm = load_model("smollm2-135m", dtype="float32", device="cpu")
    adapter = adapter_for(lm.model)
    base = perplexity(lm, load_texts("bundled"), window=args.window, max_tokens=args.tokens, batch_size=4)
    cache = PrefixCache.build(lm, base, adapter)
    print(f"SmolLM2-135M fp32, {base.n_tokens} tokens in {base.n_windows} windows of {base.n_documents} documents")
    print("point | kl (exact) | brute-force full softmax | kl_lower_bound_topk | old top-32 renormalised")
    for p in POINTS:
        result = evaluate_against(lm, base, p, cache=cache)
        exact, old = brute_force(lm, base, adapter, p)
        print(f"{p.component} L{p.layer} sigma {p.strength} | {result.kl:.6g} | {exact:.6g} | "
              f"{result.kl_lower_bound_topk:.6g} | {old:.6g}")


if __name__ == "__main__":
    main()
