"""One perturbed evaluation, paired token by token with the stored baseline of the same windows.

Metrics (all token-weighted over the baseline's scored tokens):
- delta_nll: mean per-token NLL(perturbed) - NLL(baseline); ppl_ratio = exp(delta_nll).
- ppl_ratio_se: cluster-robust (by document) delta-method SE of the ratio estimator
  delta_nll = sum_d D_d / sum_d N_d over the m documents d (D_d = the document's summed NLL difference over its
  scored windows, N_d its scored tokens): SE(delta_nll)^2 = sum_d (D_d - delta_nll N_d)^2 / (m (m - 1) Nbar^2),
  SE(ppl_ratio) = ppl_ratio * SE(delta_nll). Windows of one document are not independent, so documents are
  the sampling units (the linearised cluster estimator of Cochran, Sampling Techniques, 3rd ed., §6.11 / §9A;
  statsmodels' cluster-robust "CR1"-style m/(m-1) correction). NaN when fewer than two documents are scored.
- kl: exact full-vocabulary KL(baseline || perturbed) per token, averaged over tokens (nats). The baseline's
  final normalised hidden states are kept and its log-probs recomputed chunk by chunk at every point.
- kl_lower_bound_topk: KL of both distributions coarsened to the baseline's top-k tokens (k = `base.kl_topk`)
  plus one "rest" bucket; never exceeds `kl` (data-processing inequality).
- top1_agreement: fraction of tokens whose argmax prediction is unchanged.
A non-finite loss never raises: the row gets nonfinite=True and NaN metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from esa_pipeline.core.evaluation.perplexity import PerplexityResult, per_window_sums, unwrap
from esa_pipeline.core.evaluation.prefix_cache import PrefixCache
from esa_pipeline.core.evaluation.scoring import (
    TokenScores,
    adapter_or_default,
    concat_scores,
    final_hidden_states,
    gather_scored,
    head_with,
    model_device,
    score_hidden,
    scored_targets,
    touched_head_originals,
)
from esa_pipeline.core.perturbation.perturb import Perturbation, perturbed, resolve_slices


@dataclass
class PairedResult:
    spec: Perturbation
    delta_nll: float
    ppl_ratio: float
    ppl_ratio_se: float
    kl: float
    kl_lower_bound_topk: float
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
    windows: pd.DataFrame  # window_id, doc_id, nll_sum, n_tokens, delta_nll_sum
    notes: list[str] = field(default_factory=list)
    # Token budget actually used (adaptive budgets stop early; see core/evaluation/adaptive.py).
    batches_used: int | None = None
    stop_reason: str = "fixed_budget"
    cs_lower: float | None = None  # confidence-sequence bounds on the budget's mean per-token ΔNLL (nats/token)
    cs_upper: float | None = None
    cs_windows: int | None = None  # windows that entered the sequence (all the scored windows)

    def to_row(self) -> dict[str, Any]:
        """The result and spec fields of one `sensitivity` row (the caller adds model/dataset/variant/...)."""
        p = self.spec
        return {
            "kind": p.kind, "component": p.component, "layer": p.layer, "expert": p.expert,
            "strength": p.strength, "seed": p.seed, "mode": p.mode, "selection": p.selection,
            "group_size": p.group_size,
            "delta_nll": self.delta_nll, "ppl_ratio": self.ppl_ratio, "ppl_ratio_se": self.ppl_ratio_se,
            "kl": self.kl, "kl_lower_bound_topk": self.kl_lower_bound_topk, "top1_agreement": self.top1_agreement, "token_ppl": self.token_ppl,
            "nll_sum": self.nll_sum, "n_tokens": self.n_tokens, "nonfinite": self.nonfinite,
            "relative_change": self.relative_change, "changed_fraction": self.changed_fraction,
            "n_changed": self.n_changed, "restored": self.restored, "used_prefix_cache": self.used_prefix_cache,
            "tokens_per_s": self.tokens_per_s, "elapsed_s": self.elapsed_s,
            "batches_used": self.batches_used, "stop_reason": self.stop_reason, "cs_lower": self.cs_lower,
            "cs_upper": self.cs_upper, "cs_windows": self.cs_windows,
        }  # fmt: skip


def evaluate_against(
    lm: Any,
    base: PerplexityResult,
    p: Perturbation,
    *,
    adapter: Any = None,
    cache: PrefixCache | None = None,
    scores: list[torch.Tensor] | None = None,
    rule: Any = None,
) -> PairedResult:
    """Evaluates `lm` with `p` applied on exactly `base`'s windows and pairs the result with `base`.

    With a `rule` (`sequential.SequentialRule`), windows are scored in a seeded random order, batch by batch, and
    scoring stops once the point's anytime-valid confidence sequence has decided it (`adaptive.evaluate_adaptive`;
    a `cache` must then be built from `adaptive.visit_ordered(base)`).

    With a `cache` (built from this `base`), a perturbation confined to decoder layers >= L replays only
    layers L..N; anything else (embedding, disabled cache) runs full forwards.
    """
    check_pairing(lm, base, p)
    if rule is not None:
        from esa_pipeline.core.evaluation.adaptive import evaluate_adaptive

        return evaluate_adaptive(lm, base, p, rule, adapter=adapter, cache=cache, scores=scores)
    model, adapter, batches, start_layer, originals = point_setup(lm, base, p, adapter=adapter, cache=cache)

    started = time.perf_counter()
    with perturbed(model, adapter, p, scores) as report:
        pert = paired_scores(model, adapter, base, batches, cache=cache, start_layer=start_layer, originals=originals)
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    result = paired_metrics(base, pert)
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
        batches_used=len(batches),
        **result,
    )


def check_pairing(lm: Any, base: Any, p: Any) -> None:
    """Raises TypeError for a `base` that is not a PerplexityResult or a `p` that is not a Perturbation, and
    ValueError when `base` was computed on another model or dtype than `lm`: its exact KL recomputes the
    baseline's log-probs from `base.final_hidden` through `lm`'s head, so another model's (or dtype's) baseline
    gives numbers that mean nothing, silently."""
    if not isinstance(base, PerplexityResult):
        raise TypeError(f"base must be a PerplexityResult (from perplexity(lm, texts, ...)), got {type(base).__name__}")
    if not isinstance(p, Perturbation):
        raise TypeError(f"p must be a Perturbation, got {type(p).__name__}; from a dict d use Perturbation(**d)")
    model, _, spec = unwrap(lm)
    name = getattr(spec, "name", None)
    if base.model is not None and name is not None and base.model != name:
        raise ValueError(f"this baseline was computed on {base.model!r}, not on {name!r}: compute the baseline with "
                         "perplexity() on the same model")  # fmt: skip
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if base.dtype != dtype:
        raise ValueError(f"this baseline was computed in {base.dtype}, the model is {dtype}: compute the baseline "
                         "on the model as loaded now")  # fmt: skip


def point_setup(lm: Any, base: PerplexityResult, p: Perturbation, *, adapter: Any = None,
                cache: PrefixCache | None = None) -> tuple[torch.nn.Module, Any, list, int | None, dict]:
    """(model, adapter, batches, start layer of the prefix-cache replay or None, the head's original parameters
    when `p` touches the head) for one paired point. Raises ValueError when `cache` belongs to another baseline
    or the baseline kept no final hidden states."""
    model, _, _ = unwrap(lm)
    if cache is not None and cache.base is not base:
        raise ValueError("the prefix cache was built for another baseline: build it from this `base`")
    if adapter is None and cache is not None:
        adapter = cache.adapter
    adapter = adapter_or_default(model, adapter)
    if base.final_hidden is None:
        raise ValueError("the baseline kept no final hidden states: compute it with perplexity()")
    batches = cache.batches if cache is not None else base.batches()
    start_layer = cache.start_layer(p) if cache is not None and cache.enabled else None
    # A perturbation of the head itself (tied embedding) needs the original head for the baseline's log-probs.
    originals = touched_head_originals(model, adapter, [s.param_name for s in resolve_slices(adapter, p)])
    return model, adapter, batches, start_layer, originals


def paired_scores(model: torch.nn.Module, adapter: Any, base: PerplexityResult, batches: list, *,
                  cache: PrefixCache | None = None, start_layer: int | None = None,
                  originals: dict[str, torch.Tensor] | None = None) -> TokenScores:  # fmt: skip
    """Per-token scores of the model as it is now (call it inside the perturbation) on `base`'s windows,
    with exact KL against `base`: full body forwards, or with `start_layer` a prefix-cache replay from that
    layer. originals: the head's original parameters when the perturbation touches the head
    (`scoring.touched_head_originals`, taken before perturbing)."""
    parts = [scores for _, scores in iter_paired_batches(model, adapter, base, batches, cache=cache,
                                                         start_layer=start_layer, originals=originals)]  # fmt: skip
    return concat_scores(parts)


def iter_paired_batches(model: torch.nn.Module, adapter: Any, base: PerplexityResult, batches: list, *,
                        cache: PrefixCache | None = None, start_layer: int | None = None,
                        originals: dict[str, torch.Tensor] | None = None,
                        order: list[int] | None = None) -> Iterator[tuple[int, TokenScores]]:  # fmt: skip
    """(batch index, per-token scores of that batch) for the batches in `order` (default: 0, 1, ...), so a
    caller may stop early (adaptive budgets); the arguments are those of `paired_scores`."""
    if base.final_hidden is None:
        raise ValueError("the baseline kept no final hidden states: compute it with perplexity()")
    base_head = head_with(model, adapter, originals) if originals else None
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + batch.n_scored)
    for index in range(len(batches)) if order is None else order:
        batch = batches[index]
        if start_layer is None:
            hidden = final_hidden_states(model, adapter, batch)  # [B, T, H]
        else:
            assert cache is not None
            hidden = cache.hidden_from(start_layer, index)  # [B, T, H]
        base_hidden = base.final_hidden[offsets[index] : offsets[index + 1]]  # [n, H]
        kept = cache.baseline_logits if cache is not None else None
        base_logits = kept.get(index) if kept is not None else None
        collect: list[torch.Tensor] | None = None
        if kept is not None and base_logits is None and kept.fits(batch.n_scored, adapter.lm_head(model).weight.shape[0]):
            collect = []
        scores = score_hidden(model, adapter, gather_scored(hidden, batch), scored_targets(batch),
                              base_hidden=base_hidden, base_head=base_head, kl_topk=base.kl_topk,
                              base_logits=base_logits, collect_base_logits=collect)  # fmt: skip
        if collect:
            kept.keep(index, torch.cat(collect))  # type: ignore[union-attr]
        yield index, scores
        del hidden


def paired_metrics(base: PerplexityResult, pert: TokenScores) -> dict[str, Any]:
    """The paired metric fields of a PairedResult from per-token perturbed scores (in base's token order)."""
    windows = base.token_windows
    diff = pert.nll.double() - base.scores.nll.double()  # [N]
    n_tokens = len(diff)
    window_nll = per_window_sums(pert.nll, windows)
    window_diff = per_window_sums(diff, windows)
    frame = pd.DataFrame({
        "window_id": [w.window_id for w in windows],
        "doc_id": [w.doc_id for w in windows],
        "nll_sum": window_nll,
        "n_tokens": [w.n_scored for w in windows],
        "delta_nll_sum": window_diff,
    })  # fmt: skip
    nll_sum = float(pert.nll.double().sum())
    nonfinite = not bool(torch.isfinite(pert.nll).all())
    if nonfinite:
        nan = math.nan
        return dict(delta_nll=nan, ppl_ratio=nan, ppl_ratio_se=nan, kl=nan, kl_lower_bound_topk=nan,
                    top1_agreement=nan,
                    token_ppl=nan, nll_sum=nll_sum, nonfinite=True, windows=frame)  # fmt: skip
    delta = float(diff.sum()) / n_tokens
    return dict(
        delta_nll=delta,
        ppl_ratio=_exp(delta),
        ppl_ratio_se=_exp(delta) * clustered_ratio_se(window_diff, frame["n_tokens"].tolist(), frame["doc_id"].tolist(),
                                                      delta),
        kl=_mean(pert.kl),
        kl_lower_bound_topk=_mean(pert.kl_lower_bound),
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


def clustered_ratio_se(window_sums: list[float], window_tokens: list[int], clusters: list[str],
                       ratio: float) -> float:
    """Cluster-robust SE of sum(d_w) / sum(n_w): windows are summed per cluster (document) first, then the
    linearised ratio-estimator SE runs over clusters. NaN with fewer than two clusters."""
    frame = pd.DataFrame({"d": window_sums, "n": window_tokens, "cluster": clusters})
    per_cluster = frame.groupby("cluster", sort=False)[["d", "n"]].sum()
    return ratio_estimator_se(per_cluster["d"].tolist(), per_cluster["n"].astype(int).tolist(), ratio)


def _mean(values: torch.Tensor | None) -> float:
    return math.nan if values is None or values.numel() == 0 else float(values.double().mean())


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
