"""One-pass layer measures from the prefix cache's captured residual streams (no extra forward).

For decoder layer ℓ with input x_ℓ (the residual stream entering it, [tokens, H]) and span n:
  block_influence(ℓ, n)   = mean over tokens of 1 − cos(x_ℓ, x_{ℓ+n})
                            (n = 1 is ShortGPT's Block Influence, Men et al. 2024, "ShortGPT: Layers in Large
                            Language Models are More Redundant Than You Expect")
  angular_distance(ℓ, n)  = mean over tokens of arccos(cos(x_ℓ, x_{ℓ+n})) / π
                            (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; they
                            use the last token of each sequence, here every scored token is averaged)
Tokens are the baseline's scored positions (the same tokens ΔNLL averages over). x_ℓ for ℓ < N is the prefix
cache's captured input of layer ℓ. The model's own last hidden state (HF `hidden_states[-1]`) is taken AFTER
the final norm, so it must not stand in for x_N: x_N is the last layer's output before that norm, computed by
running only the last layer from its captured input (1/N of one forward). Cosines are computed in float64.

`layer_drop_agreement` compares these measures with measured `layer_drop` ΔNLL (Spearman rank correlation):
a layer whose output barely differs from its input should be cheap to drop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from esa_pipeline.core.analysis._common import spearman_test

BLOCK_INFLUENCE_COLUMNS = ["model", "dataset", "window_tokens", "layer", "span", "block_influence", "angular_distance",
                           "n_tokens", "random_weights"]  # fmt: skip
AGREEMENT_COLUMNS = ["model", "measure", "span", "drop_component", "spearman_rho", "p_value", "n_layers", "note"]


def layer_similarity(cache: Any, spans: Sequence[int] = (1,)) -> pd.DataFrame:
    """`block_influence` rows [model, dataset, window_tokens, layer, span, ...] for every layer ℓ with ℓ + span ≤ N.

    cache: an enabled PrefixCache (raises RuntimeError if it is disabled). spans: positive ints < N+1.
    """
    n = cache.n_layers
    if not spans or any(int(s) != s or not 1 <= s <= n for s in spans):
        raise ValueError(f"spans must be integers in 1..{n} (the model has {n} layers), got {list(spans)}")
    keys = [(layer, s) for s in spans for layer in range(n - s + 1)]
    one_minus_cos = dict.fromkeys(keys, 0.0)
    angle = dict.fromkeys(keys, 0.0)
    n_tokens = 0
    for b, batch in enumerate(cache.batches):
        hidden = [cache.layer_hidden(layer, b) for layer in range(n + 1)]  # each [B, T, H]
        mask = batch.score_mask.to(hidden[0].device)  # [B, T]
        states = [h[mask].double() for h in hidden]  # each [tokens, H]
        n_tokens += int(mask.sum())
        for layer, s in keys:
            cos = torch.nn.functional.cosine_similarity(states[layer], states[layer + s], dim=-1).clamp(-1, 1)
            one_minus_cos[(layer, s)] += float((1 - cos).sum())
            angle[(layer, s)] += float(torch.arccos(cos).sum()) / math.pi
    base = cache.base
    rows = [{
        "model": base.model, "dataset": base.dataset, "window_tokens": base.window, "layer": layer, "span": s,
        "block_influence": one_minus_cos[(layer, s)] / n_tokens, "angular_distance": angle[(layer, s)] / n_tokens,
        "n_tokens": n_tokens, "random_weights": base.random_weights,
    } for layer, s in keys]  # fmt: skip
    return pd.DataFrame(rows, columns=BLOCK_INFLUENCE_COLUMNS)


def layer_drop_agreement(similarity: pd.DataFrame, sensitivity: pd.DataFrame, *, span: int = 1,
                         drop_component: str = "block") -> pd.DataFrame:  # fmt: skip
    """Spearman rank correlation, per model, between each measure at `span` and the layer_drop ΔNLL of
    `drop_component` over the layers measured both ways. A positive rho: layers the measure calls influential
    are the ones whose removal costs most. Fewer than 3 common layers or a constant column gives NULL rho and
    a note (could not test), never a number."""
    drops = sensitivity[(sensitivity["kind"] == "layer_drop") & (sensitivity["component"] == drop_component)]
    rows = []
    for model, sim in similarity[similarity["span"] == span].groupby("model"):
        merged = sim.merge(drops[drops["model"] == model][["layer", "delta_nll"]], on="layer")
        for measure in ("block_influence", "angular_distance"):
            rho = p_value = math.nan
            note = ""
            if len(merged) < 3:
                note = f"only {len(merged)} layers measured both ways (need 3)"
            elif merged[measure].nunique() < 2 or merged["delta_nll"].nunique() < 2:
                note = "a constant column has no ranking"
            else:
                rho, p_value = spearman_test(merged[measure], merged["delta_nll"])  # exact p for few layers
            rows.append({"model": model, "measure": measure, "span": span, "drop_component": drop_component,
                         "spearman_rho": rho, "p_value": p_value, "n_layers": len(merged), "note": note})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
