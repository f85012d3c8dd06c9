"""Token scoring from final hidden states: the head and log-softmax applied in token chunks.

A model's forward materialises [B, T, V] logits (Gemma-3: 4 x 512 x 262,144 fp32 = 2.1 GB, and a
log-softmax copy doubles it). Here the body runs without the head (`final_hidden_states`: [B, T, H] after the
final norm), only the scored positions are gathered ([n, H]), and `adapter.head_logits` + log-softmax run
over `chunk_tokens` of them at a time, so at most [chunk, V] logits exist at once.

KL(baseline || perturbed) is exact over the full vocabulary: the baseline keeps its final normalised hidden
states [N, H], and each chunk recomputes the baseline's logits with the (unperturbed) head beside the
perturbed ones, unless a sweep keeps them (`BaselineLogits`: the same numbers, computed once per batch). `kl_lower_bound_topk` coarsens both distributions to the baseline's top-k tokens plus one
"rest" bucket; by the data-processing inequality (Cover & Thomas, Elements of Information Theory, Thm 2.8.1 /
the log-sum inequality) a KL of a coarsening never exceeds the KL of the full distributions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esa_pipeline.core.evaluation.windows import WindowBatch

# Working memory allowed for one chunk of head logits and the fp32/fp64 copies made from it.
DEFAULT_HEAD_BUDGET_BYTES = 256 * 2**20
# Bytes per vocabulary entry per token while scoring a chunk: head output (<= 4) + fp32 logits (4); with KL,
# fp64 log-probs of both models, their difference and p (4 x 8).
_BYTES_PER_VOCAB_ENTRY = 8
_BYTES_PER_VOCAB_ENTRY_KL = 8 + 32


# Baseline logits a sweep may keep between points (`BaselineLogits`): SmolLM2's smoke budget needs 0.2 GB,
# Gemma-3's (262,144-token head) 0.5 GB; beyond the budget, batches are recomputed per point as before.
DEFAULT_BASELINE_LOGITS_BYTES = 2**30


class BaselineLogits:
    """The baseline's fp32 head logits [n, V] per batch, kept between the points of a sweep while they fit.

    Every paired point needs the baseline's full distribution for its exact KL; recomputing it costs one head
    pass per point (about a quarter of a Gemma-3-270M point on CPU, where the head is ~84 % of a forward). The
    kept tensors are the chunks `score_hidden` computed the first time, so later points see identical numbers.
    budget_bytes: 0 keeps nothing. Raises ValueError on a negative budget.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BASELINE_LOGITS_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"BaselineLogits: budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._kept: dict[int, torch.Tensor] = {}

    def get(self, batch_index: int) -> torch.Tensor | None:
        return self._kept.get(batch_index)

    def fits(self, n_tokens: int, vocab: int) -> bool:
        return self.nbytes + n_tokens * vocab * 4 <= self.budget_bytes

    def keep(self, batch_index: int, logits: torch.Tensor) -> None:
        """Keep `logits` [n, V] fp32 for `batch_index` when they fit the budget (else drop them)."""
        size = logits.numel() * logits.element_size()
        if batch_index not in self._kept and self.nbytes + size <= self.budget_bytes:
            self._kept[batch_index] = logits
            self.nbytes += size

    def __len__(self) -> int:
        return len(self._kept)


def adapter_or_default(model: torch.nn.Module, adapter: Any = None) -> Any:
    """`adapter`, or the registry's adapter for `model` (`models.adapters.adapter_for`) when it is None.
    Raises what `adapter_for` raises for a model the registry cannot name."""
    if adapter is not None:
        return adapter
    from esa_pipeline.core.models.adapters import adapter_for

    return adapter_for(model)


@dataclass
class TokenScores:
    """Per scored token, flattened in window order (window_id, then position)."""

    nll: torch.Tensor  # [N] float32
    argmax: torch.Tensor  # [N] long
    kl: torch.Tensor | None = None  # [N] float64: exact KL(baseline || this model) per token
    kl_lower_bound: torch.Tensor | None = None  # [N] float64: KL of the top-k + rest coarsening


def concat_scores(parts: list[TokenScores]) -> TokenScores:
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return TokenScores(cat("nll"), cat("argmax"), cat("kl"), cat("kl_lower_bound"))  # type: ignore[arg-type]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def final_hidden_states(model: torch.nn.Module, adapter: Any, batch: WindowBatch) -> torch.Tensor:
    """Hidden states after the final norm, [B, T, H], from the model's body only (no head, no [B, T, V]).

    Runs `model.base_model` and captures the output of `adapter.final_norm(model)`, so this is exactly what
    the model's own head would receive. No attention mask: right padding cannot affect earlier positions.
    Raises RuntimeError if the final norm is not called by the body.
    """
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = adapter.final_norm(model).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model.base_model(input_ids=batch.input_ids.to(model_device(model)), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"{type(model).__name__}: the final norm ({adapter.final_norm_path}) ran {len(captured)} times in "
            "model.base_model's forward, expected once: fix the adapter's final_norm_path"
        )
    return captured[0]


def full_logits(model: torch.nn.Module, adapter: Any, batch: WindowBatch) -> torch.Tensor:
    """Logits [B, T, V] the unchunked way (tests and small inputs only: this is the tensor scoring avoids)."""
    with torch.inference_mode():
        return adapter.head_logits(model, final_hidden_states(model, adapter, batch))


def gather_scored(hidden: torch.Tensor, batch: WindowBatch) -> torch.Tensor:
    """[B, T, H] -> [n, H]: the scored positions of every row, in window order."""
    return torch.cat([hidden[row, start:stop] for row, (start, stop) in enumerate(batch.spans)])


def scored_targets(batch: WindowBatch) -> torch.Tensor:
    """[n] long: the target of every scored position, in window order."""
    return torch.cat([batch.target_ids[row, start:stop] for row, (start, stop) in enumerate(batch.spans)])


def chunk_tokens_for(vocab: int, *, with_kl: bool, budget_bytes: int = DEFAULT_HEAD_BUDGET_BYTES) -> int:
    """Tokens per head chunk so that the chunk's logits and their copies stay within `budget_bytes`."""
    per_token = vocab * (_BYTES_PER_VOCAB_ENTRY_KL if with_kl else _BYTES_PER_VOCAB_ENTRY)
    return max(1, budget_bytes // per_token)


def score_hidden(
    model: torch.nn.Module,
    adapter: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    base_hidden: torch.Tensor | None = None,
    base_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kl_topk: int = 32,
    chunk_tokens: int | None = None,
    base_logits: torch.Tensor | None = None,
    collect_base_logits: list[torch.Tensor] | None = None,
) -> TokenScores:
    """Per-token NLL, argmax and (with `base_hidden`) exact KL of scored hidden states, chunk by chunk.

    hidden: [n, H] final normalised hidden states of the scored positions; targets: [n] long.
    base_hidden: [n, H] the baseline's states at the same positions; KL(baseline || this) is computed from
      `base_head(base_hidden)` (default `adapter.head_logits(model, ·)`; pass the unperturbed head when the
      perturbation touches the head itself).
    kl_topk: k of the top-k + rest lower bound. chunk_tokens: tokens per chunk (default from the budget).
    base_logits: [n, V] fp32 the baseline's logits at these positions, kept from an earlier call (`BaselineLogits`),
      used instead of `base_head(base_hidden)`; collect_base_logits: a list to which each chunk's computed
      baseline logits are appended (to keep them).
    Log-softmax runs in fp32 and KL in fp64, whatever the model dtype.
    """
    head = lambda h: adapter.head_logits(model, h)  # noqa: E731
    base_head = base_head or head
    n = hidden.shape[0]
    if chunk_tokens is None:
        vocab = adapter.lm_head(model).weight.shape[0]
        chunk_tokens = chunk_tokens_for(vocab, with_kl=base_hidden is not None)
    nll, argmax, kl, bound = [], [], [], []
    with torch.inference_mode():
        for start in range(0, n, chunk_tokens):
            stop = min(n, start + chunk_tokens)
            logits = head(hidden[start:stop]).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            tgt = targets[start:stop].to(logits.device)
            nll.append((lse - logits.gather(-1, tgt[:, None]).squeeze(-1)).cpu())
            argmax.append(logits.argmax(dim=-1).cpu())
            if base_hidden is not None:
                if base_logits is not None:
                    base_chunk = base_logits[start:stop]  # [c, V]
                else:
                    base_chunk = base_head(base_hidden[start:stop]).float()  # [c, V]
                    if collect_base_logits is not None:
                        collect_base_logits.append(base_chunk)
                kl_chunk, bound_chunk = _kl_and_lower_bound(base_chunk, logits, kl_topk)
                del base_chunk
                kl.append(kl_chunk.cpu())
                bound.append(bound_chunk.cpu())
    return TokenScores(
        nll=torch.cat(nll) if nll else torch.zeros(0),
        argmax=torch.cat(argmax) if argmax else torch.zeros(0, dtype=torch.long),
        kl=torch.cat(kl) if base_hidden is not None else None,
        kl_lower_bound=torch.cat(bound) if base_hidden is not None else None,
    )


def _kl_and_lower_bound(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token exact KL(p || q) and the KL of the (top-k of p, rest) coarsenings, p = softmax(a), q = softmax(b).

    a, b: [c, V] logits (or log-probs) of the baseline and the perturbed model. With the logit shift x = b - a
    (well conditioned in fp32), c = E_p[x] and y = x - c:  KL = log E_p[e^y] - E_p[y]
    = log1p(E_p[y] + E_p[e^y - 1 - y]) - E_p[y]. Every term of E_p[e^y - 1 - y] is ≥ 0 and `expm1(y) - y` keeps
    its relative precision for small y, so a tiny KL is never the difference of two numbers near 1 (as
    log Σ p e^y was: relative error 9e-5 at KL ≈ 5e-11, vs 4e-9 here against an 80-bit reference). fp64; the
    two p-weighted sums are BLAS dot products, which also halves the time of the former elementwise sums.
    """
    p = a.to(torch.float64, copy=True)  # [c, V]; never in place on the caller's tensor
    p = p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
    p = p.div_(p.sum(dim=-1, keepdim=True))  # softmax(a) in fp64, in place
    x = (b.float() - a.float()).double()  # [c, V]
    pw = p.unsqueeze(1)  # [c, 1, V]

    def expect(v: torch.Tensor) -> torch.Tensor:  # E_p[v] per token: [c, V] -> [c]
        return torch.bmm(pw, v.unsqueeze(2)).reshape(-1)

    c = expect(x)  # [c]; -inf when q gives 0 where p does not, nan when b has nan
    k = min(k, a.shape[-1])
    ids = a.float().topk(k, dim=-1).indices  # [c, k] the baseline's top-k tokens
    p_top, x_top = p.gather(-1, ids), x.gather(-1, ids)  # [c, k]
    y = x.sub_(c[:, None])  # [c, V], in place of x
    delta = expect(y)  # [c] E_p[y]: 0 up to the rounding of c
    log_s = torch.log1p(delta + expect(torch.expm1(y).sub_(y)))  # [c] log E_p[e^y]
    # e^y overflows fp64 where the perturbed logits moved > 709 nats relative to the baseline's mean shift (a
    # catastrophic point; also 0 * inf = nan where p underflowed): log E_p[e^y] is finite there, so those rows
    # take it as a logsumexp — their KL is hundreds of nats, where the expm1 form's relative precision is moot
    overflowed = ~torch.isfinite(log_s) & torch.isfinite(c)  # [c]
    if bool(overflowed.any()):
        rows = a[overflowed].double()  # [r, V]
        log_p = rows - torch.logsumexp(rows, dim=-1, keepdim=True)
        log_s[overflowed] = torch.logsumexp(log_p + y[overflowed], dim=-1)
    exact = log_s - delta
    exact = torch.where(torch.isinf(c) & (c < 0), torch.inf, exact)
    # log q_j = log p_j + y_j - log E_p[e^y]
    log_ratio = log_s[:, None] - (x_top - c[:, None])  # [c, k] log(p_j / q_j)
    top = (p_top * log_ratio).sum(dim=-1)
    if k == a.shape[-1]:
        return exact, top
    q_top = p_top * (-log_ratio).exp()
    p_rest = (1 - p_top.sum(dim=-1)).clamp_min(0)
    q_rest = (1 - q_top.sum(dim=-1)).clamp_min(0)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), torch.zeros_like(p_rest))
    return exact, top + rest


def head_with(model: torch.nn.Module, adapter: Any, originals: dict[str, torch.Tensor]
              ) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """head(h) computed with the head module's parameters `originals` (name in the head module -> data).

    For a perturbation that touches the head (e.g. a tied embedding), KL needs the baseline's head beside
    the perturbed one: each call swaps the parameters' `.data` to the originals and back, copying nothing.
    """
    module = adapter.lm_head(model)
    params = {name: module.get_parameter(name) for name in originals}

    def head(h: torch.Tensor) -> torch.Tensor:
        current = {name: p.data for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data = originals[name]
            return adapter.head_logits(model, h)
        finally:
            for name, p in params.items():
                p.data = current[name]

    return head


def touched_head_originals(model: torch.nn.Module, adapter: Any, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Clones of the head module's parameters that share storage with `param_names` (empty if none do)."""
    touched = {model.get_parameter(name).untyped_storage().data_ptr() for name in param_names}
    return {name: p.data.clone() for name, p in adapter.lm_head(model).named_parameters()
            if p.untyped_storage().data_ptr() in touched}  # fmt: skip


class HeadMismatch(RuntimeError):
    """`adapter.head_logits(final_norm(h))` does not reproduce the model's own logits."""


def check_head(model: torch.nn.Module, adapter: Any, input_ids: torch.Tensor, *, rtol: float = 1e-3,
               atol: float = 1e-3) -> None:  # fmt: skip
    """Compares the chunked path's logits with `model(input_ids).logits` on a short input ([1, t], t <= 8).

    Guards every architecture whose forward transforms the head's output (soft-capping, logit scaling):
    an adapter that does not override `head_logits` for it raises HeadMismatch instead of scoring wrongly.
    """
    ids = input_ids[:, :8].to(model_device(model))  # [1, t]
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits.float()  # [1, t, V]
        batch = WindowBatch([0], ids.cpu(), ids.cpu(), torch.ones_like(ids, dtype=torch.bool), [(0, ids.shape[1])])
        got = adapter.head_logits(model, final_hidden_states(model, adapter, batch)).float()
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        raise HeadMismatch(
            f"{type(adapter).__name__}.head_logits(final_norm(h)) differs from {type(model).__name__}'s logits "
            f"(max |diff| {float((got - expected).abs().max()):.3g}): override head_logits in the adapter to "
            "apply what the model's forward does after its head (soft-capping, logit scaling)"
        )
