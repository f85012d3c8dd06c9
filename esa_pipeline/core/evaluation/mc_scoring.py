"""Multiple-choice log-likelihoods with the project's own evaluator, equal to lm-eval's per request.

Why not lm-eval per perturbation point: `evaluate` pays ~4-5 s of per-call overhead here and its request cache
is keyed by request text, not weights. This module scores the same (context, continuation) requests that an
lm-eval Task builds, with lm-eval 0.4.13 HFLM's tokenization and truncation rules (`TemplateLM.loglikelihood`,
`_encode_pair`, `_loglikelihood_tokens`): the continuation's log-likelihood is the sum of the log-softmax of
the scored positions, computed in fp32, with the head applied only at those positions. Requests become `TokenWindow`s, so they batch with `make_batches` and
replay through the sweep's `PrefixCache` (a perturbation in layer L re-runs only layers L..N).
`esa_pipeline_tests/core/test_mc_scoring.py` checks every bundled task's tokenization against HFLM's and the
log-likelihoods against `HFLM.loglikelihood` (1e-5 relative).

The one place this deliberately differs from lm-eval: a continuation that merges with the context at the join
(SmolLM2: context "Ans" + continuation "wer" tokenizes as one token "Answer"). lm-eval's `_encode_pair` then
keeps the whole string's tokens after len(context tokens) - an empty or wrong continuation (0.0 in a batch, an
AssertionError alone). Here the context and continuation are encoded separately at such a join
(`join_merged=True`): the log-probability of the continuation's own tokens after the context's tokens
(≈ -12.46 for the example). A continuation with no tokens at all raises `EmptyContinuation` naming the item.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esa_pipeline.core.evaluation.scoring import TokenScores, adapter_or_default, final_hidden_states
from esa_pipeline.core.evaluation.windows import TokenWindow, WindowBatch, make_batches

# HFLM's fallback when neither the config nor the tokenizer gives a usable maximum length.
DEFAULT_MAX_LENGTH = 2048
_MAX_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


class EmptyContinuation(ValueError):
    """A request whose continuation has no tokens: it cannot be scored (and must never score 0.0)."""


@dataclass(frozen=True)
class EncodedRequest:
    """One (context, continuation) request as the model sees it."""

    key: str  # who asked: "<task>/<item_id>/choice<j>", used in error messages
    context_enc: tuple[int, ...]
    continuation_enc: tuple[int, ...]
    join_merged: bool  # the continuation merged with the context at the join; encoded separately


class LmEvalTokenization:
    """lm-eval 0.4.13 HFLM's tokenization with its defaults (add_bos_token=None: the tokenizer's own default
    for special tokens, dropped when the text already starts with the BOS string)."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module | None = None) -> None:
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is None and eos is None:
            raise ValueError("tokenizer has neither a BOS nor an EOS token: lm-eval needs one as prefix token")
        self.prefix_token_id = int(bos if bos is not None else eos)
        self.max_length = _max_length(tokenizer, model)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and text.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(text, **kwargs))

    def lm_eval_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Exactly what lm-eval would score: `TemplateLM.loglikelihood`'s split (may be empty or wrong at a
        merged join; see `encode_request`)."""
        if context == "":
            continuation_enc = self.encode(continuation, add_special_tokens=False)
            if continuation_enc and continuation_enc[0] == self.prefix_token_id:
                return continuation_enc[:1], continuation_enc[1:]
            return [self.prefix_token_id], continuation_enc
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:  # trailing spaces move to the continuation (word-boundary tokenization)
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_enc = self.encode(context)
        return context_enc, whole[len(context_enc) :]

    def encode_request(self, key: str, context: str, continuation: str) -> EncodedRequest:
        """lm-eval's split where the context's tokens are a prefix of the whole string's tokens; otherwise
        (a merged join) the context and the continuation encoded separately. Raises EmptyContinuation."""
        context_enc, continuation_enc = self.lm_eval_pair(context, continuation)
        merged = False
        if context != "":
            n_spaces = len(context) - len(context.rstrip())
            ctx, cont = (context[:-n_spaces], context[-n_spaces:] + continuation) if n_spaces else (context, continuation)
            whole = self.encode(ctx + cont)
            if not continuation_enc or whole[: len(context_enc)] != context_enc:
                merged = True
                continuation_enc = self.encode(cont, add_special_tokens=False)
        if not continuation_enc:
            raise EmptyContinuation(
                f"{key}: continuation {continuation!r} after context ...{context[-40:]!r} has no tokens, so it "
                "has no log-likelihood; fix the item (an empty answer choice?)"
            )
        return EncodedRequest(key, tuple(context_enc), tuple(continuation_enc), merged)


def _max_length(tokenizer: Any, model: torch.nn.Module | None) -> int:
    config = getattr(model, "config", None)
    for attr in _MAX_LENGTH_ATTRS:
        if config is not None and isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def request_window(request: EncodedRequest, index: int, max_length: int) -> TokenWindow:
    """HFLM's model input: (context + continuation)[-(max_length + 1):][:-1]; the last len(continuation)
    positions predict the continuation."""
    if len(request.continuation_enc) > max_length:
        raise ValueError(f"{request.key}: continuation of {len(request.continuation_enc)} tokens exceeds the "
                         f"model's maximum length {max_length}")  # fmt: skip
    whole = (request.context_enc + request.continuation_enc)[-(max_length + 1) :]
    return TokenWindow(index, request.key, tuple(whole[:-1]), request.continuation_enc)


@dataclass
class RequestBatches:
    """Requests as right-padded batches of distinct model inputs, longest first (little padding per batch).

    Requests with the same model input (one-token answers after one context: the input is the context alone)
    share one row, as lm-eval's one-token logits cache does: `rows[r]` is the row index of request r.
    """

    requests: list[EncodedRequest]
    windows: list[TokenWindow]  # one per distinct input, in batch order
    batch_size: int
    pad_id: int
    rows: list[int]  # request -> index into `windows`
    max_length: int

    @classmethod
    def build(cls, requests: list[EncodedRequest], max_length: int, batch_size: int, pad_id: int) -> RequestBatches:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        own = [request_window(r, i, max_length) for i, r in enumerate(requests)]
        first: dict[tuple[int, ...], int] = {}
        for i, window in enumerate(own):
            first.setdefault(window.input_ids, i)
        distinct = sorted(first.values(), key=lambda i: (-len(own[i].input_ids), i))
        position = {own[i].input_ids: k for k, i in enumerate(distinct)}
        windows = [TokenWindow(k, own[i].doc_id, own[i].input_ids, own[i].target_ids) for k, i in enumerate(distinct)]
        rows = [position[w.input_ids] for w in own]
        return cls(requests, windows, batch_size, pad_id, rows, max_length)

    def batches(self) -> list[WindowBatch]:
        return make_batches(self.windows, self.batch_size, self.pad_id)


@dataclass
class RequestScores:
    """Per request (request order): log-likelihood of the continuation and lm-eval's `is_greedy`."""

    loglikelihood: np.ndarray  # [R] float64, nats (<= 0)
    is_greedy: np.ndarray  # [R] bool
    tokens: TokenScores  # per scored token of `RequestBatches.windows`, batch order (PrefixCache's check)


def score_requests(
    model: torch.nn.Module,
    batches: RequestBatches,
    forward: Callable[[int, WindowBatch], torch.Tensor] | None = None,
    *,
    adapter: Any = None,
) -> RequestScores:
    """Log-likelihood per request. `forward(batch_index, batch)` returns the final normalised hidden states
    [B, T, H] (default: the model's body, `scoring.final_hidden_states`; `PrefixCache.hidden_from` for a
    perturbed point). `adapter` (default `adapter_for(model)`) supplies the head.

    The head runs only at the positions that predict a continuation ([n, V] per row), never over the whole
    [B, T, V]: a request's context is tens of tokens and its answer a few, and Gemma-3's 262,144-token head is
    ~63 % of its forward, so full logits cost Gemma most of its scoring time for positions nobody reads.
    """
    adapter = adapter_or_default(model, adapter)
    users: dict[int, list[int]] = {}
    for request, row in enumerate(batches.rows):
        users.setdefault(row, []).append(request)
    ll = np.full(len(batches.requests), np.nan, dtype=np.float64)
    greedy = np.zeros(len(batches.requests), dtype=bool)
    nll_parts: list[torch.Tensor] = []
    argmax_parts: list[torch.Tensor] = []
    row = 0
    for index, batch in enumerate(batches.batches()):
        hidden = final_hidden_states(model, adapter, batch) if forward is None else forward(index, batch)  # [B, T, H]
        with torch.inference_mode():
            for b in range(hidden.shape[0]):
                length = len(batches.windows[row].input_ids)
                targets = {r: batches.requests[r].continuation_enc[-batches.max_length :] for r in users[row]}
                start, stop = batch.spans[b]  # the window's own scored positions; stop == length
                first = min(start, *(length - len(t) for t in targets.values()))
                # lm-eval's arithmetic: fp32 log_softmax (not logits - logsumexp: they differ by up to
                # 1.5e-5 per token on SmolLM2), gather, fp32 sum.
                logits = adapter.head_logits(model, hidden[b, first:length]).float()  # [n, V]
                logprobs = F.log_softmax(logits, dim=-1)  # [n, V]
                for request, target in targets.items():
                    ids = torch.tensor(target, device=logprobs.device)  # [t]
                    scored = logprobs[length - len(target) - first :]  # [t, V]
                    ll[request] = float(scored.gather(-1, ids[:, None]).squeeze(-1).sum())
                    greedy[request] = bool((scored.argmax(dim=-1) == ids).all())
                # the window's per-token NLL as perplexity.score_batch computes it (PrefixCache.build's check)
                own = logits[start - first :]  # [s, V]
                own_targets = batch.target_ids[b, start:stop].to(own.device)  # [s]
                lse = torch.logsumexp(own, dim=-1)  # [s]
                nll_parts.append((lse - own.gather(-1, own_targets[:, None]).squeeze(-1)).cpu())
                argmax_parts.append(own.argmax(dim=-1).cpu())
                del logits, logprobs, own
                row += 1
        del hidden
    tokens = TokenScores(nll=torch.cat(nll_parts) if nll_parts else torch.zeros(0),
                         argmax=torch.cat(argmax_parts) if argmax_parts else torch.zeros(0, dtype=torch.long))  # fmt: skip
    return RequestScores(ll, greedy, tokens)


@dataclass
class RequestBaseline:
    """The unperturbed scores of a set of requests, in the shape `PrefixCache.build` reads
    (`batches()` and per-token `scores.nll` in batch order)."""

    requests: RequestBatches
    scores: TokenScores
    result: RequestScores

    def batches(self) -> list[WindowBatch]:
        return self.requests.batches()
