"""Fixed-length token windows, scored exactly like lm-eval 0.4.13's `loglikelihood_rolling`.

lm-eval builds, per document, `make_disjoint_window(w)` for each `w` of
`get_rolling_token_windows(tokens, prefix_token=bos, max_seq_len=W, context_len=1)` and feeds the model
`(context + continuation)[-(W + 1):][:-1]`, scoring the last `len(continuation)` positions. That gives:

* first window: input `[bos] + t[:n-1]`, predicts `t[:n]` with `n = min(W, len(t))`;
* middle windows: input `t[p-1 : p+W-1]`, predicts `t[p : p+W]` (one token of context, no overlap);
* the last, partial window is *rolled back*: its input is the W tokens ending just before the document's
  last token, and only its final `len(t) - p` positions are scored.

Every token of a document is predicted exactly once. The reference implementation lives in
`lm_eval.utils.get_rolling_token_windows` / `make_disjoint_window`; `esa_pipeline_tests/core/test_perplexity.py`
checks this module against it token for token.

`bos_every_window=True` departs from lm-eval for models trained to see BOS at position 0 of every sequence
(Gemma: without it, Gemma-3-270M's token PPL on the bundled corpus is ~4x higher in later windows; the open
lm-eval issue #2382 asks for the same option): each later window's input is `[bos]` followed by the W - 1
tokens before its last target, so its first target is predicted from BOS alone, and the window length and the
set of scored tokens stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenWindow:
    window_id: int
    doc_id: str
    input_ids: tuple[int, ...]  # what the model sees, length <= W
    target_ids: tuple[int, ...]  # the scored tokens: predictions of the last len(target_ids) positions
    doc_window: int = 0  # position of this window within its document (0 = the one after the prefix token)

    @property
    def n_scored(self) -> int:
        return len(self.target_ids)

    @property
    def n_context(self) -> int:
        """Leading input positions that are context only (their predictions are not scored)."""
        return len(self.input_ids) - len(self.target_ids)


def rolling_windows(
    tokens: list[int], prefix_token: int, window: int, *, bos_every_window: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, target_ids) pairs for one document; identical to lm-eval's rolling scheme with
    `context_len=1` after `make_disjoint_window` and HFLM's `[-(W+1):][:-1]` input truncation.

    With `bos_every_window`, windows after the first start with `prefix_token` too (see the module docstring).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    pairs: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return pairs
    first = min(window, len(tokens))
    pairs.append(([prefix_token] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, window)
        end = predicted + n_pred
        # window >= n_pred and predicted >= window here, so end - window - 1 >= 0: a full-length input.
        if bos_every_window:
            pairs.append(([prefix_token] + tokens[end - window : end - 1], tokens[predicted:end]))
        else:
            pairs.append((tokens[end - window - 1 : end - 1], tokens[predicted:end]))
        predicted = end
    return pairs


@dataclass
class WindowBatch:
    """Right-padded batch of windows; only `score_mask` positions contribute to any metric."""

    window_ids: list[int]
    input_ids: torch.Tensor  # [B, T] long, right-padded with the prefix token
    target_ids: torch.Tensor  # [B, T] long, 0 where not scored
    score_mask: torch.Tensor  # [B, T] bool
    spans: list[tuple[int, int]]  # per row: [start, stop) of the scored positions (contiguous)

    @property
    def n_scored(self) -> int:
        return int(self.score_mask.sum())


def make_batches(windows: list[TokenWindow], batch_size: int, pad_id: int) -> list[WindowBatch]:
    """Consecutive windows in document order, `batch_size` per batch.

    Right padding needs no attention mask for a causal decoder: real positions never attend to later
    (padded) ones, so scored logits do not depend on what padding follows them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w.input_ids) for w in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        target_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        score_mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # [B, T]
        spans = []
        for row, w in enumerate(chunk):
            length = len(w.input_ids)
            spans.append((w.n_context, length))
            input_ids[row, :length] = torch.tensor(w.input_ids)
            target_ids[row, w.n_context : length] = torch.tensor(w.target_ids)
            score_mask[row, w.n_context : length] = True
        batches.append(WindowBatch([w.window_id for w in chunk], input_ids, target_ids, score_mask, spans))
    return batches
