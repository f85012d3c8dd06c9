"""Baseline perplexity over lm-eval-compatible token windows, keeping what paired metrics need.

Token, word and byte perplexity follow lm-eval's `loglikelihood_rolling` tasks: the summed NLL of every token
of every document divided by the number of tokens, whitespace words (`re.split(r"\\s+", text)`) or UTF-8
bytes of the scored text. Log-softmax is always computed in fp32, whatever the model dtype.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from esa_pipeline.core.evaluation.text import Document
from esa_pipeline.core.evaluation.windows import TokenWindow, WindowBatch, make_batches, rolling_windows

# Up to this vocabulary size the "top-k" kept per token is the whole distribution, so KL is exact.
FULL_DISTRIBUTION_MAX_VOCAB = 1024
IMPLAUSIBLE_TOKEN_PPL = 2.0
REPEAT_NGRAM = 16
MAX_REPEATED_NGRAM_FRACTION = 0.3


@dataclass
class TokenScores:
    """Per scored token, flattened in window order (window_id, then position)."""

    nll: torch.Tensor  # [N] float32
    argmax: torch.Tensor  # [N] long
    topk_ids: torch.Tensor | None = None  # [N, k] long: baseline top-k support
    topk_logprobs: torch.Tensor | None = None  # [N, k] float32: log-probs on `topk_ids`


@dataclass
class PerplexityResult:
    model: str | None
    dataset: str
    window: int
    batch_size: int
    dtype: str
    random_weights: bool | None
    n_windows: int
    n_tokens: int
    n_words: int
    n_bytes: int
    nll_sum: float
    token_ppl: float
    word_ppl: float
    byte_ppl: float
    token_accuracy: float  # top-1 next-token accuracy over scored tokens
    tokens_per_s: float
    elapsed_s: float
    peak_mem_bytes: int
    windows: pd.DataFrame  # window_id, doc_id, nll_sum, n_tokens, n_correct
    token_windows: list[TokenWindow] = field(repr=False)
    scores: TokenScores = field(repr=False)
    pad_id: int = 0
    kl_support: str = "none"  # "full" (vocab <= 1024), "top-<k>" or "none"
    flags: list[str] = field(default_factory=list)

    def batches(self, batch_size: int | None = None) -> list[WindowBatch]:
        return make_batches(self.token_windows, batch_size or self.batch_size, self.pad_id)

    def to_row(self) -> dict[str, Any]:
        """One `baselines` row (provenance columns are added by storage)."""
        return {
            "model": self.model, "dataset": self.dataset, "window_tokens": self.window, "n_windows": self.n_windows,
            "n_tokens": self.n_tokens, "n_words": self.n_words, "n_bytes": self.n_bytes,
            "nll_sum": self.nll_sum, "token_ppl": self.token_ppl, "word_ppl": self.word_ppl,
            "byte_ppl": self.byte_ppl, "token_accuracy": self.token_accuracy,
            "tokens_per_s": self.tokens_per_s, "peak_mem_bytes": self.peak_mem_bytes,
            "flags": ";".join(self.flags), "dtype": self.dtype, "random_weights": self.random_weights,
        }  # fmt: skip

    def window_rows(self) -> pd.DataFrame:
        """`baseline_windows` rows."""
        rows = self.windows.copy()
        rows.insert(0, "window_tokens", self.window)
        rows.insert(0, "dataset", self.dataset)
        rows.insert(0, "model", self.model)
        return rows


# ---------------------------------------------------------------- model plumbing shared with paired/prefix_cache


def unwrap(lm: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, spec-or-None) from a LoadedModel (or anything with .model/.tokenizer)."""
    if not hasattr(lm, "model") or not hasattr(lm, "tokenizer"):
        raise TypeError(f"expected a LoadedModel (from esa_pipeline.core.load_model), got {type(lm).__name__}")
    if lm.model.training:
        raise ValueError("model is in training mode (dropout would make NLL random): call model.eval() first")
    return lm.model, lm.tokenizer, getattr(lm, "spec", None)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def full_forward(model: torch.nn.Module, batch: WindowBatch) -> torch.Tensor:
    """Logits [B, T, V]. No attention mask: right padding cannot affect earlier (scored) positions."""
    input_ids = batch.input_ids.to(model_device(model))  # [B, T]
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False).logits


def score_batch(
    logits: torch.Tensor, batch: WindowBatch, *, keep_topk: int = 0, support_ids: torch.Tensor | None = None
) -> TokenScores:
    """Scores the scored positions of one batch, row by row so fp32 copies stay one window large.

    keep_topk: also return each token's top-k ids and log-probs (baseline).
    support_ids: [n_scored, k] ids at which to return log-probs (perturbed run, baseline's top-k support).
    """
    nll, argmax, topk_ids, topk_lp = [], [], [], []
    offset = 0
    with torch.inference_mode():
        for row, (start, stop) in enumerate(batch.spans):
            row_logits = logits[row, start:stop].float()  # [n, V] fp32
            targets = batch.target_ids[row, start:stop].to(row_logits.device)  # [n]
            lse = torch.logsumexp(row_logits, dim=-1)  # [n]
            nll.append((lse - row_logits.gather(-1, targets[:, None]).squeeze(-1)).cpu())
            argmax.append(row_logits.argmax(dim=-1).cpu())
            if keep_topk:
                values, ids = row_logits.topk(min(keep_topk, row_logits.shape[-1]), dim=-1)  # [n, k]
                topk_ids.append(ids.cpu())
                topk_lp.append((values - lse[:, None]).cpu())
            if support_ids is not None:
                ids = support_ids[offset : offset + stop - start].to(row_logits.device)  # [n, k]
                topk_lp.append((row_logits.gather(-1, ids) - lse[:, None]).cpu())
            offset += stop - start
    return TokenScores(
        nll=torch.cat(nll),
        argmax=torch.cat(argmax),
        topk_ids=torch.cat(topk_ids) if topk_ids else None,
        topk_logprobs=torch.cat(topk_lp) if topk_lp else None,
    )


def concat_scores(parts: list[TokenScores]) -> TokenScores:
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return TokenScores(cat("nll"), cat("argmax"), cat("topk_ids"), cat("topk_logprobs"))


def per_window_sums(values: torch.Tensor, windows: list[TokenWindow]) -> list[float]:
    """Sums a per-token vector [N] over each window's scored tokens, in float64."""
    counts = [w.n_scored for w in windows]
    return [float(chunk.double().sum()) for chunk in torch.split(values, counts)]


@dataclass
class PeakMemory:
    peak_bytes: int = 0
    source: str = ""


@contextmanager
def measure_peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Peak memory of the enclosed block: CUDA max allocated on GPU, else the process's peak RSS.

    On Linux the RSS high-water mark is reset first (/proc/self/clear_refs), so the figure belongs to this
    block; elsewhere it is the process lifetime peak (getrusage), which can only overstate.
    """
    peak = PeakMemory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak.peak_bytes, peak.source = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
        return
    status = Path("/proc/self/status")
    resettable = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False  # not Linux, or not permitted: fall back to the lifetime peak below
    yield peak
    if resettable and status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            peak.peak_bytes, peak.source = int(match.group(1)) * 1024, "rss_hwm"
            return
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peak.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    peak.source = "rss_lifetime_peak"


# ---------------------------------------------------------------- tokenization into windows


def count_words(text: str) -> int:
    """lm-eval's `Task.count_words`."""
    return len(re.split(r"\s+", text))


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval HFLM's prefix token: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token to score window starts")


def bos_every_window(tokenizer: Any) -> bool:
    """True when the tokenizer itself starts every encoded text with BOS (Gemma, Llama, Mistral): the model
    was trained to see BOS at position 0, so every window gets it (`windows.rolling_windows`)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def tokenize_windows(
    tokenizer: Any, docs: list[Document], window: int, max_tokens: int | None
) -> tuple[list[TokenWindow], int, int]:
    """Windows of whole documents in order, stopping before `max_tokens` scored tokens would be exceeded
    (at least one window). Returns (windows, n_words, n_bytes) of the scored text.

    Text is encoded without special tokens (lm-eval with add_bos_token=False): BOS enters only as the
    window prefix token — of the first window of a document, or of every window when the tokenizer itself
    prepends BOS (`bos_every_window`).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    prefix = prefix_token_id(tokenizer)
    every = bos_every_window(tokenizer)
    windows: list[TokenWindow] = []
    n_words = n_bytes = n_scored = 0
    for doc in docs:
        tokens = tokenizer.encode(doc.text, add_special_tokens=False, verbose=False)  # long docs are windowed
        taken = 0
        for input_ids, target_ids in rolling_windows(tokens, prefix, window, bos_every_window=every):
            if max_tokens is not None and windows and n_scored + len(target_ids) > max_tokens:
                break
            windows.append(TokenWindow(len(windows), doc.doc_id, tuple(input_ids), tuple(target_ids)))
            taken += len(target_ids)
            n_scored += len(target_ids)
        if taken:
            scored_text = doc.text if taken == len(tokens) else tokenizer.decode(tokens[:taken])
            n_words += count_words(scored_text)
            n_bytes += len(scored_text.encode("utf-8"))
        if (max_tokens is not None and n_scored >= max_tokens) or taken < len(tokens):
            break
    if not windows:
        raise ValueError("no tokens to score: the texts are empty")
    return windows, n_words, n_bytes


def as_documents(texts: list[Document] | list[str]) -> list[Document]:
    return [t if isinstance(t, Document) else Document(f"doc{i:04d}", str(t)) for i, t in enumerate(texts)]


# ---------------------------------------------------------------- the evaluation


def perplexity(
    lm: Any,
    texts: list[Document] | list[str],
    window: int = 512,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4,
    dataset: str = "bundled",
    keep_topk: int = 32,
) -> PerplexityResult:
    """Token/word/byte perplexity of `lm` on `texts` over `window`-token windows (lm-eval's rolling scheme),
    keeping per-token NLL, argmax and top-k log-probs for paired comparisons (`evaluate_against`)."""
    model, tokenizer, spec = unwrap(lm)
    windows, n_words, n_bytes = tokenize_windows(tokenizer, as_documents(texts), window, max_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    topk = vocab if vocab <= FULL_DISTRIBUTION_MAX_VOCAB else keep_topk
    batches = make_batches(windows, batch_size, prefix_token_id(tokenizer))
    return _evaluate(
        model, spec, windows, batches, n_words, n_bytes,
        lambda batch: full_forward(model, batch), topk, vocab, dataset, window, batch_size, prefix_token_id(tokenizer),
    )  # fmt: skip


def _evaluate(
    model: torch.nn.Module,
    spec: Any,
    windows: list[TokenWindow],
    batches: list[WindowBatch],
    n_words: int,
    n_bytes: int,
    forward: Callable[[WindowBatch], torch.Tensor],
    topk: int,
    vocab: int,
    dataset: str,
    window: int,
    batch_size: int,
    pad_id: int,
) -> PerplexityResult:
    device = model_device(model)
    with measure_peak_memory(device) as peak:
        start = time.perf_counter()
        scores = concat_scores([score_batch(forward(b), b, keep_topk=topk) for b in batches])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    targets = torch.cat([torch.tensor(w.target_ids) for w in windows])  # [N]
    correct = (scores.argmax == targets).to(torch.float64)  # [N]
    n_tokens = len(targets)
    nll_sum = float(scores.nll.double().sum())
    frame = pd.DataFrame({
        "window_id": [w.window_id for w in windows],
        "doc_id": [w.doc_id for w in windows],
        "nll_sum": per_window_sums(scores.nll, windows),
        "n_tokens": [w.n_scored for w in windows],
        "n_correct": [int(c) for c in per_window_sums(correct, windows)],
    })  # fmt: skip
    result = PerplexityResult(
        model=getattr(spec, "name", None),
        dataset=dataset,
        window=window,
        batch_size=batch_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        random_weights=getattr(spec, "random_weights", None),
        n_windows=len(windows),
        n_tokens=n_tokens,
        n_words=n_words,
        n_bytes=n_bytes,
        nll_sum=nll_sum,
        token_ppl=_safe_exp(nll_sum / n_tokens),
        word_ppl=_safe_exp(nll_sum / n_words),
        byte_ppl=_safe_exp(nll_sum / n_bytes),
        token_accuracy=float(correct.mean()),
        tokens_per_s=n_tokens / elapsed,
        elapsed_s=elapsed,
        peak_mem_bytes=peak.peak_bytes,
        windows=frame,
        token_windows=windows,
        scores=scores,
        pad_id=pad_id,
        kl_support=("full" if topk == vocab else f"top-{topk}") if topk else "none",
    )
    result.flags = sanity_flags(result)
    return result


def _safe_exp(x: float) -> float:
    if not math.isfinite(x):
        return math.nan
    return math.exp(x) if x < 700 else math.inf


# ---------------------------------------------------------------- sanity guard


def sanity_flags(
    result: PerplexityResult,
    *,
    min_token_ppl: float = IMPLAUSIBLE_TOKEN_PPL,
    ngram: int = REPEAT_NGRAM,
    max_repeated_fraction: float = MAX_REPEATED_NGRAM_FRACTION,
) -> list[str]:
    """Flags a baseline that cannot be trusted as a reference for natural text.

    - "nonfinite": NaN/inf NLL.
    - "implausibly_low_ppl": token PPL < 2, which no LM reaches on natural text; it means repeated or
      memorised input (the seed's PPL 1.025 came from 4 sentences repeated 100 times).
    - "repeated_text": two windows score identical token sequences, or more than `max_repeated_fraction`
      of the scored token `ngram`-grams already occurred earlier in the scored text.
    """
    flags = []
    if not math.isfinite(result.nll_sum):
        flags.append("nonfinite")
    elif result.token_ppl < min_token_ppl:
        flags.append("implausibly_low_ppl")
    if _has_duplicate_windows(result.token_windows) or (
        repeated_ngram_fraction(result.token_windows, ngram) > max_repeated_fraction
    ):
        flags.append("repeated_text")
    return flags


def _has_duplicate_windows(windows: list[TokenWindow]) -> bool:
    seen: set[tuple[int, ...]] = set()
    for w in windows:
        if w.target_ids in seen:
            return True
        seen.add(w.target_ids)
    return False


def repeated_ngram_fraction(windows: list[TokenWindow], n: int = REPEAT_NGRAM) -> float:
    """Fraction of scored token n-grams (within each document) that already occurred earlier."""
    seen: set[tuple[int, ...]] = set()
    total = repeated = 0
    by_doc: dict[str, list[int]] = {}
    for w in windows:
        by_doc.setdefault(w.doc_id, []).extend(w.target_ids)
    for tokens in by_doc.values():
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            total += 1
            repeated += gram in seen
            seen.add(gram)
    return repeated / total if total else 0.0
