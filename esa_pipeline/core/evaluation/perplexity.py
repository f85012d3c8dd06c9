"""Baseline perplexity over lm-eval-compatible token windows, keeping what paired metrics need.

Token, word and byte perplexity follow lm-eval's `loglikelihood_rolling` tasks: the summed NLL of every token
of every document divided by the number of tokens, whitespace words (`re.split(r"\\s+", text)`) or UTF-8
bytes of the scored text. Log-softmax is always computed in fp32, whatever the model dtype, and the head runs
in token chunks (`scoring.py`), so no [B, T, V] logits tensor is ever held.

With a token budget, windows are a seeded sample stratified by document (`sample_windows`), never the corpus's
first N tokens; every window records its `doc_id`.
"""

from __future__ import annotations

import hashlib
import math
import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from esa_pipeline.core.checks import check_int
from esa_pipeline.core.evaluation.scoring import (
    TokenScores,
    adapter_or_default,
    check_head,
    concat_scores,
    final_hidden_states,
    gather_scored,
    model_device,
    score_hidden,
    scored_targets,
)
from esa_pipeline.core.evaluation.text import Document
from esa_pipeline.core.evaluation.windows import TokenWindow, WindowBatch, make_batches, rolling_windows

__all__ = [
    "PerplexityResult", "TokenScores", "concat_scores", "full_forward", "model_device", "perplexity", "score_batch",
    "unwrap",
]

# Seed of the document-stratified window sample drawn under a token budget.
DEFAULT_SAMPLE_SEED = 0
# k of the top-k + rest KL lower bound.
DEFAULT_KL_TOPK = 32
IMPLAUSIBLE_TOKEN_PPL = 2.0
REPEAT_NGRAM = 16
MAX_REPEATED_NGRAM_FRACTION = 0.3


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
    windows: pd.DataFrame  # window_id, doc_id, doc_window, nll_sum, n_tokens, n_correct
    token_windows: list[TokenWindow] = field(repr=False)
    scores: TokenScores = field(repr=False)
    # [N, H] final normalised hidden states of the scored tokens (model dtype, model device): exact KL
    # recomputes the baseline's full-vocabulary log-probs from them at every point.
    final_hidden: torch.Tensor | None = field(default=None, repr=False)
    pad_id: int = 0
    prefix_token: str = "bos"  # which token starts each document's first window: "bos" or "eos"
    prefix_token_id: int = 0
    sample_seed: int | None = None  # seed of the window sample; None when every window was scored
    n_documents: int = 0  # documents with at least one scored window
    kl_topk: int = DEFAULT_KL_TOPK
    flags: list[str] = field(default_factory=list)
    # Seed of the visit order when token_windows are in a seeded uniformly random order (adaptive budgets:
    # `adaptive.visit_ordered`); None in document order, as `perplexity()` returns them.
    visit_seed: int | None = None

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
            "prefix_token": self.prefix_token, "prefix_token_id": self.prefix_token_id,
            "sample_seed": self.sample_seed, "n_documents": self.n_documents,
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


def full_forward(model: torch.nn.Module, batch: WindowBatch) -> torch.Tensor:
    """The model's own logits [B, T, V] for one batch, in one piece: for short inputs only (zero-shot requests).
    Perplexity and paired scoring never hold these; they score through the chunked head (`scoring.py`)."""
    with torch.inference_mode():
        return model(input_ids=batch.input_ids.to(model_device(model)), use_cache=False).logits


def score_batch(logits: torch.Tensor, batch: WindowBatch) -> TokenScores:
    """Per-token NLL and argmax of a batch's scored positions from logits [B, T, V] (fp32 log-softmax)."""
    nll, argmax = [], []
    with torch.inference_mode():
        for row, (start, stop) in enumerate(batch.spans):
            row_logits = logits[row, start:stop].float()  # [n, V]
            targets = batch.target_ids[row, start:stop].to(row_logits.device)  # [n]
            lse = torch.logsumexp(row_logits, dim=-1)  # [n]
            nll.append((lse - row_logits.gather(-1, targets[:, None]).squeeze(-1)).cpu())
            argmax.append(row_logits.argmax(dim=-1).cpu())
    return TokenScores(nll=torch.cat(nll), argmax=torch.cat(argmax))


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


def prefix_token(tokenizer: Any) -> tuple[str, int]:
    """lm-eval HFLM's prefix token: ("bos", BOS id), else ("eos", EOS id)."""
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token_id is not None:
            return name, int(token_id)
    raise ValueError("tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token to score window starts")


def bos_every_window(tokenizer: Any) -> bool:
    """True when the tokenizer itself starts every encoded text with BOS (Gemma, Llama, Mistral): the model
    was trained to see BOS at position 0, so every window gets it (`windows.rolling_windows`)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval HFLM's prefix token id: BOS, else EOS."""
    return prefix_token(tokenizer)[1]


def _rank(seed: int, *key: object) -> bytes:
    """A seeded, platform- and library-independent sort key (sha256), stable when other items are added."""
    return hashlib.sha256(repr((seed, *key)).encode()).digest()


def sample_windows(doc_windows: list[list[int]], doc_ids: list[str], max_tokens: int, seed: int
                   ) -> list[tuple[int, int]]:  # fmt: skip
    """(document index, window index) pairs of a seeded sample stratified by document.

    doc_windows[d] lists the scored-token counts of document d's windows. Documents are visited in a seeded
    order, each document's full-length windows in a seeded order before its shorter ones (a document's last
    window is usually a short tail: drawn first, it would spend a window's slot on a few tokens); round r takes
    the r-th window of every document that has one, so every document contributes one window before any
    contributes two. A window that would exceed `max_tokens` is skipped and the sample goes on with the ones
    that still fit (stopping at the first misfit left budgets of 512 tokens holding 277). At least one window
    is taken.
    """
    full = max((n for counts in doc_windows for n in counts), default=0)
    docs = sorted(range(len(doc_windows)), key=lambda d: _rank(seed, doc_ids[d]))
    orders = {d: sorted(range(len(doc_windows[d])), key=lambda w: (doc_windows[d][w] < full, _rank(seed, doc_ids[d], w)))
              for d in docs}  # fmt: skip
    chosen: list[tuple[int, int]] = []
    total = 0
    for r in range(max((len(o) for o in orders.values()), default=0)):
        for d in docs:
            if r >= len(orders[d]):
                continue
            w = orders[d][r]
            if chosen and total + doc_windows[d][w] > max_tokens:
                continue
            chosen.append((d, w))
            total += doc_windows[d][w]
            if total >= max_tokens:
                return sorted(chosen)
    return sorted(chosen)


_REPLACEMENT = "\ufffd"


def _utf8_width(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with byte `lead` (1 for an invalid lead)."""
    for width, (mask, value) in ((1, (0x80, 0x00)), (2, (0xE0, 0xC0)), (3, (0xF0, 0xE0)), (4, (0xF8, 0xF0))):
        if lead & mask == value:
            return width
    return 1


class _DocText:
    """Byte and word positions of token prefixes of one document (memoised)."""

    def __init__(self, tokenizer: Any, text: str, tokens: list[int]) -> None:
        self.tokenizer, self.text, self.tokens = tokenizer, text, tokens
        self.raw = text.encode("utf-8")
        self._memo: dict[int, tuple[int, int]] = {0: (0, 0), len(tokens): (len(self.raw), count_words(text))}

    def position(self, k: int) -> tuple[int, int]:
        """(UTF-8 bytes, whitespace words) of the text carried by tokens[:k].

        A prefix ending inside a multi-byte character carries the bytes its tokens hold: the decoder shows
        them as U+FFFD, and the next tokens' decode starts with one U+FFFD per continuation byte they hold
        (Python's and Rust's lossy UTF-8 decoding both replace lone continuation bytes one by one).
        Words are counted on the prefix (lm-eval's count_words), so a document's windows sum to its words.
        """
        if k not in self._memo:
            decoded = self.tokenizer.decode(self.tokens[:k])
            clean = decoded.rstrip(_REPLACEMENT)
            n_bytes = len(clean.encode("utf-8"))
            if clean != decoded and n_bytes < len(self.raw):
                width = _utf8_width(self.raw[n_bytes])
                after = self.tokenizer.decode(self.tokens[k : k + width])
                held_later = len(after) - len(after.lstrip(_REPLACEMENT))
                n_bytes += min(width - 1, max(0, width - held_later))
            self._memo[k] = (n_bytes, count_words(clean) if clean else 0)
        return self._memo[k]


def tokenize_windows(
    tokenizer: Any, docs: list[Document], window: int, max_tokens: int | None, *,
    sample_seed: int = DEFAULT_SAMPLE_SEED,
) -> tuple[list[TokenWindow], int, int]:  # fmt: skip
    """Windows of every document, or with `max_tokens` a seeded sample stratified by document
    (`sample_windows`), in document order. Returns (windows, n_words, n_bytes) of the scored text; bytes and
    words of a window are differences of its end and start prefixes (`_DocText.position`), so a whole
    document counts exactly lm-eval's words and bytes.

    Text is encoded without special tokens (lm-eval with add_bos_token=False): the prefix token enters as
    the first input of each document's first window, or of every window when the tokenizer itself prepends
    BOS (`bos_every_window`).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    prefix = prefix_token_id(tokenizer)
    every = bos_every_window(tokenizer)
    encoded, pairs = [], []
    for doc in docs:
        tokens = tokenizer.encode(doc.text, add_special_tokens=False, verbose=False)  # long docs are windowed
        encoded.append(tokens)
        pairs.append(rolling_windows(tokens, prefix, window, bos_every_window=every))
    counts = [[len(t) for _, t in doc_pairs] for doc_pairs in pairs]
    if max_tokens is None:
        chosen = [(d, w) for d, c in enumerate(counts) for w in range(len(c))]
    else:
        chosen = sample_windows(counts, [d.doc_id for d in docs], max_tokens, sample_seed)
    if not chosen:
        raise ValueError("no tokens to score: the texts are empty")
    windows: list[TokenWindow] = []
    n_words = n_bytes = 0
    texts: dict[int, _DocText] = {}
    for d, w in chosen:
        input_ids, target_ids = pairs[d][w]
        end = sum(counts[d][: w + 1])
        doc_text = texts.setdefault(d, _DocText(tokenizer, docs[d].text, encoded[d]))
        (b0, w0), (b1, w1) = doc_text.position(end - len(target_ids)), doc_text.position(end)
        n_bytes += b1 - b0
        n_words += w1 - w0
        windows.append(TokenWindow(len(windows), docs[d].doc_id, tuple(input_ids), tuple(target_ids), w))
    return windows, n_words, n_bytes


def as_documents(texts: list[Document] | list[str]) -> list[Document]:
    """`texts` as Documents (a str becomes `doc0000`, `doc0001`, ...). Raises TypeError for anything but a list
    or tuple of str/Document: one str would be iterated as one document per character, numbers as their digits."""
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str | Document) for t in texts):
        shown = type(texts).__name__ if not isinstance(texts, list | tuple) else \
            f"a {type(texts).__name__} holding {sorted({type(t).__name__ for t in texts})}"
        raise TypeError(f"texts must be a list of str or Document (one per document), got {shown}; wrap one text "
                        "as [text], or use load_texts('bundled')")  # fmt: skip
    return [t if isinstance(t, Document) else Document(f"doc{i:04d}", t) for i, t in enumerate(texts)]


# ---------------------------------------------------------------- the evaluation


def perplexity(
    lm: Any,
    texts: list[Document] | list[str],
    window: int = 512,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4,
    dataset: str = "bundled",
    sample_seed: int = DEFAULT_SAMPLE_SEED,
    kl_topk: int = DEFAULT_KL_TOPK,
    adapter: Any = None,
) -> PerplexityResult:
    """Token/word/byte perplexity of `lm` on `texts` over `window`-token windows (lm-eval's rolling scheme),
    keeping per-token NLL, argmax and final hidden states [N, H] for paired comparisons (`evaluate_against`).

    max_tokens: score a seeded, document-stratified sample of windows of at most this many tokens
    (`sample_windows`, seed `sample_seed`); None scores every window. kl_topk: k of the KL lower bound.
    Raises, before any work, ValueError for a count that is not an int (bools and floats included) or below 1,
    and TypeError for `texts` that are not a list of str/Document.
    """
    # before any work: a bool passes as an int and a NaN budget compares False with everything (it scored the
    # whole corpus)
    check_int("window", window, minimum=1)
    check_int("max_tokens", max_tokens, minimum=1, allow_none=True)
    check_int("batch_size", batch_size, minimum=1)
    check_int("sample_seed", sample_seed)
    check_int("kl_topk", kl_topk, minimum=1)
    docs = as_documents(texts)
    model, tokenizer, spec = unwrap(lm)
    adapter = adapter_or_default(model, adapter)
    windows, n_words, n_bytes = tokenize_windows(
        tokenizer, docs, window, max_tokens, sample_seed=sample_seed)
    name, prefix_id = prefix_token(tokenizer)
    batches = make_batches(windows, batch_size, prefix_id)
    check_head(model, adapter, batches[0].input_ids[:1])
    device = model_device(model)
    with measure_peak_memory(device) as peak:
        start = time.perf_counter()
        parts, hidden = [], []
        for b in batches:
            scored = gather_scored(final_hidden_states(model, adapter, b), b)  # [n, H]
            parts.append(score_hidden(model, adapter, scored, scored_targets(b)))
            hidden.append(scored)
        scores = concat_scores(parts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    result = _result(model, spec, windows, scores, n_words, n_bytes, dataset, window, batch_size, elapsed,
                     peak.peak_bytes)  # fmt: skip
    result.final_hidden = torch.cat(hidden)
    result.pad_id, result.prefix_token, result.prefix_token_id = prefix_id, name, prefix_id
    result.sample_seed = None if max_tokens is None else sample_seed
    result.n_documents = len({w.doc_id for w in windows})
    result.kl_topk = kl_topk
    return result


def _result(model: torch.nn.Module, spec: Any, windows: list[TokenWindow], scores: TokenScores, n_words: int,
            n_bytes: int, dataset: str, window: int, batch_size: int, elapsed: float, peak_bytes: int,
            ) -> PerplexityResult:  # fmt: skip
    targets = torch.cat([torch.tensor(w.target_ids) for w in windows])  # [N]
    correct = (scores.argmax == targets).to(torch.float64)  # [N]
    n_tokens = len(targets)
    nll_sum = float(scores.nll.double().sum())
    frame = pd.DataFrame({
        "window_id": [w.window_id for w in windows],
        "doc_id": [w.doc_id for w in windows],
        "doc_window": [w.doc_window for w in windows],
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
        peak_mem_bytes=peak_bytes,
        windows=frame,
        token_windows=windows,
        scores=scores,
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
