"""One perturbed evaluation, paired token by token with the stored baseline of the same windows.

Metrics (all token-weighted over the baseline's scored tokens):
- delta_nll: mean per-token NLL(perturbed) - NLL(baseline); ppl_ratio = exp(delta_nll).
- ppl_ratio_se: delta method on the ratio estimator delta_nll = sum_w d_w / sum_w n_w over windows w
  (d_w = the window's summed NLL difference, n_w its tokens): SE(delta_nll)^2 = sum_w (d_w - delta_nll n_w)^2
  / (m (m - 1) nbar^2) for m windows, and SE(ppl_ratio) = ppl_ratio * SE(delta_nll). NaN with one window.
- kl: KL(baseline || perturbed) per token. With vocab <= 1024 the baseline keeps the whole distribution and
  this is the exact KL. Otherwise both distributions are restricted to the baseline's top-k tokens
  (`keep_topk`, default 32) and renormalised there: the KL of the conditional distributions on that
  support. It ignores mass moving into the tail, so it is a lower-resolution view, not a bound.
- top1_agreement: fraction of tokens whose argmax prediction is unchanged.
A non-finite loss never raises: the row gets nonfinite=True and NaN metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from esa_pipeline.core.evaluation.perplexity import (
    PerplexityResult,
    TokenScores,
    concat_scores,
    full_forward,
    model_device,
    per_window_sums,
    score_batch,
    unwrap,
)
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed


@dataclass
class PairedResult:
    spec: Perturbation
    delta_nll: float
    ppl_ratio: float
    ppl_ratio_se: float
    kl: float
    top1_agreement: float
    token_ppl: float
    nll_sum: float
    n_tokens: int
    nonfinite: bool
    restored: bool | None
    relative_change: float
    changed_fraction: float
    n_changed: int
    used_prefix_cache: bool
    tokens_per_s: float
    elapsed_s: float
    windows: pd.DataFrame  # window_id, nll_sum, n_tokens, delta_nll_sum
    notes: list[str] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        """The result and spec fields of one `sensitivity` row (the caller adds model/dataset/variant/...)."""
        p = self.spec
        return {
            "kind": p.kind, "component": p.component, "layer": p.layer, "expert": p.expert,
            "strength": p.strength, "seed": p.seed, "mode": p.mode, "selection": p.selection,
            "group_size": p.group_size,
            "delta_nll": self.delta_nll, "ppl_ratio": self.ppl_ratio, "ppl_ratio_se": self.ppl_ratio_se,
            "kl": self.kl, "top1_agreement": self.top1_agreement, "token_ppl": self.token_ppl,
            "nll_sum": self.nll_sum, "n_tokens": self.n_tokens, "nonfinite": self.nonfinite,
            "relative_change": self.relative_change, "changed_fraction": self.changed_fraction,
            "n_changed": self.n_changed, "restored": self.restored, "used_prefix_cache": self.used_prefix_cache,
            "tokens_per_s": self.tokens_per_s, "elapsed_s": self.elapsed_s,
        }  # fmt: skip


def evaluate_against(
    lm: Any,
    base: PerplexityResult,
    p: Perturbation,
    *,
    adapter: Any = None,
    cache: PrefixCache | None = None,
    scores: list[torch.Tensor] | None = None,
) -> PairedResult:
    """Evaluates `lm` with `p` applied on exactly `base`'s windows and pairs the result with `base`.

    With a `cache` (built from this `base`), a perturbation confined to decoder layers >= L replays only
    layers L..N; anything else (embedding, disabled cache) runs full forwards.
    """
    model, _, _ = unwrap(lm)
    if cache is not None and cache.base is not base:
        raise ValueError("the prefix cache was built for another baseline: build it from this `base`")
    if adapter is None:
        if cache is not None:
            adapter = cache.adapter
        else:
            from esa_pipeline.core.models.adapters import adapter_for

            adapter = adapter_for(model)
    batches = cache.batches if cache is not None else base.batches()
    start_layer = cache.start_layer(p) if cache is not None and cache.enabled else None
    support = base.scores.topk_ids  # [N, k] or None

    started = time.perf_counter()
    parts: list[TokenScores] = []
    offset = 0
    with perturbed(model, adapter, p, scores) as report:
        for index, batch in enumerate(batches):
            if start_layer is None:
                logits = full_forward(model, batch)  # [B, T, V]
            else:
                logits = cache.forward_from(start_layer, index)  # type: ignore[union-attr]  # [B, T, V]
            batch_support = None if support is None else support[offset : offset + batch.n_scored]
            parts.append(score_batch(logits, batch, support_ids=batch_support))
            offset += batch.n_scored
            del logits
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    result = paired_metrics(base, concat_scores(parts))
    n_tokens = base.n_tokens
    return PairedResult(
        spec=p,
        n_tokens=n_tokens,
        restored=report.restored,
        relative_change=report.relative_change,
        changed_fraction=report.changed_fraction,
        n_changed=report.n_changed,
        used_prefix_cache=start_layer is not None,
        tokens_per_s=n_tokens / elapsed,
        elapsed_s=elapsed,
        notes=list(report.notes),
        **result,
    )


def paired_metrics(base: PerplexityResult, pert: TokenScores) -> dict[str, Any]:
    """The paired metric fields of a PairedResult from per-token perturbed scores (in base's token order)."""
    windows = base.token_windows
    diff = pert.nll.double() - base.scores.nll.double()  # [N]
    n_tokens = len(diff)
    window_nll = per_window_sums(pert.nll, windows)
    window_diff = per_window_sums(diff, windows)
    frame = pd.DataFrame({
        "window_id": [w.window_id for w in windows],
        "nll_sum": window_nll,
        "n_tokens": [w.n_scored for w in windows],
        "delta_nll_sum": window_diff,
    })  # fmt: skip
    nll_sum = float(pert.nll.double().sum())
    nonfinite = not bool(torch.isfinite(pert.nll).all())
    if nonfinite:
        nan = math.nan
        return dict(delta_nll=nan, ppl_ratio=nan, ppl_ratio_se=nan, kl=nan, top1_agreement=nan,
                    token_ppl=nan, nll_sum=nll_sum, nonfinite=True, windows=frame)  # fmt: skip
    delta = float(diff.sum()) / n_tokens
    return dict(
        delta_nll=delta,
        ppl_ratio=_exp(delta),
        ppl_ratio_se=_exp(delta) * ratio_estimator_se(window_diff, frame["n_tokens"].tolist(), delta),
        kl=kl_on_support(base.scores.topk_logprobs, pert.topk_logprobs),
        top1_agreement=float((pert.argmax == base.scores.argmax).double().mean()),
        token_ppl=_exp(nll_sum / n_tokens),
        nll_sum=nll_sum,
        nonfinite=False,
        windows=frame,
    )


def ratio_estimator_se(window_sums: list[float], window_tokens: list[int], ratio: float) -> float:
    """SE of sum(d_w) / sum(n_w) by linearisation over m windows (NaN for m < 2)."""
    m = len(window_sums)
    if m < 2:
        return math.nan
    d = torch.tensor(window_sums, dtype=torch.float64)  # [m]
    n = torch.tensor(window_tokens, dtype=torch.float64)  # [m]
    residual = d - ratio * n  # [m]
    return float(torch.sqrt((residual**2).sum() / (m - 1) / m) / n.mean())


def kl_on_support(base_logprobs: torch.Tensor | None, pert_logprobs: torch.Tensor | None) -> float:
    """Mean per-token KL(p || q) of the two distributions renormalised on the baseline's support.

    base_logprobs, pert_logprobs: [N, k] log-probs at the same token ids. NaN if no support was kept.
    """
    if base_logprobs is None or pert_logprobs is None:
        return math.nan
    p_log = base_logprobs.double() - torch.logsumexp(base_logprobs.double(), dim=-1, keepdim=True)  # [N, k]
    q_log = pert_logprobs.double() - torch.logsumexp(pert_logprobs.double(), dim=-1, keepdim=True)  # [N, k]
    per_token = (p_log.exp() * (p_log - q_log)).sum(dim=-1)  # [N]
    return float(per_token.mean())


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
