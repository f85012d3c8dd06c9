"""Text sources for perplexity: the bundled corpus, local files, and Hugging Face datasets by name.

Nothing here sets global state: offline behaviour is governed by the caller's `HF_HUB_OFFLINE` /
`HF_DATASETS_OFFLINE` environment, and an unreachable dataset raises `DatasetUnavailable` naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from esa_pipeline.core.checks import check_int

BUNDLED_CORPUS_DIR = Path(__file__).resolve().parents[3] / "data" / "corpus"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Streamed sets are effectively unbounded: without max_docs we stop here rather than read for hours.
DEFAULT_STREAMED_DOCS = 2000
# Seed of the document sample drawn from a hub dataset when max_docs is set.
DEFAULT_DOC_SEED = 0
# Streamed sets cannot be ranked whole: they are read through a seeded shuffle buffer of this many rows.
STREAM_SHUFFLE_BUFFER = 10_000


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


class DatasetUnavailable(RuntimeError):
    """A named dataset cannot be loaded (offline without a cached copy, or missing package)."""


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    split: str
    streamed: bool


HUB_SOURCES: dict[str, _HubSource] = {
    "wikitext-103": _HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "test", streamed=False),
    "c4": _HubSource("allenai/c4", "en", "validation", streamed=True),
    "openwebtext": _HubSource("Skylion007/openwebtext", None, "train", streamed=True),
}


def load_texts(source: str, *, max_docs: int | None = None, seed: int = DEFAULT_DOC_SEED) -> list[Document]:
    """Documents from `source`: "bundled", a .txt/.jsonl/.parquet file or a directory of them, or a
    dataset name in HUB_SOURCES. Order is deterministic (sorted files, dataset order).

    max_docs on a local source keeps the first documents; on a hub dataset it draws a seeded sample
    (`sample_documents`; streamed sets through a `seed`ed shuffle buffer of STREAM_SHUFFLE_BUFFER rows), so a
    small budget measures the corpus, not its first articles. Every document keeps its id (recorded per window).
    """
    check_int("max_docs", max_docs, minimum=1, allow_none=True)  # a bool or float passed as a count before
    check_int("seed", seed)
    if source == "bundled":
        docs = _load_directory(BUNDLED_CORPUS_DIR, max_docs)
        if not docs:
            raise FileNotFoundError(f"bundled corpus is empty: no *.txt under {BUNDLED_CORPUS_DIR}")
        return docs
    if source in HUB_SOURCES:
        return _load_hub(source, HUB_SOURCES[source], max_docs, seed)
    path = Path(source).expanduser()
    if path.is_dir():
        docs = _load_directory(path, max_docs)
        if not docs:
            raise FileNotFoundError(f"no non-empty {'/'.join(LOCAL_SUFFIXES)} documents under {path}")
        return docs
    if path.is_file():
        return _take(_load_file(path), max_docs)
    raise ValueError(
        f"unknown text source {source!r}: use 'bundled', an existing .txt/.jsonl/.parquet file or directory, "
        f"or one of {sorted(HUB_SOURCES)}"
    )


def _take(docs: Iterable[Document], max_docs: int | None) -> list[Document]:
    out: list[Document] = []
    for doc in docs:
        if not doc.text.strip():
            continue  # lm-eval yields no window for an empty document; neither do we
        out.append(doc)
        if max_docs is not None and len(out) >= max_docs:
            break
    return out


def _load_directory(directory: Path, max_docs: int | None) -> list[Document]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    return _take((doc for f in files for doc in _load_file(f)), max_docs)


def _load_file(path: Path) -> Iterable[Document]:
    if path.suffix == ".txt":
        yield Document(path.stem, path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each JSONL line must be an "
                                     "object with a 'text' field") from None  # fmt: skip
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(f"{path}:{line_no}: each JSONL line must be an object with a 'text' field")
                if not isinstance(record["text"], str):  # a number would be scored as its digits
                    raise ValueError(f"{path}:{line_no}: 'text' must be a string, got {type(record['text']).__name__}")
                doc_id = str(record.get("id", f"{path.stem}:{line_no}"))
                yield Document(doc_id, record["text"])
    elif path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if "text" not in frame.columns:
            raise ValueError(f"{path}: parquet needs a 'text' column; found {list(frame.columns)}")
        ids = frame["id"].astype(str) if "id" in frame.columns else [f"{path.stem}:{i}" for i in range(len(frame))]
        for row, (doc_id, text) in enumerate(zip(ids, frame["text"], strict=True)):
            if not isinstance(text, str):  # str() made a NULL cell the document "None"
                raise ValueError(f"{path} row {row}: 'text' must be a string, got {type(text).__name__}")
            yield Document(str(doc_id), text)
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")


def sample_documents(docs: Iterable[Document], max_docs: int | None, seed: int) -> list[Document]:
    """A seeded sample of `max_docs` non-empty documents (all when None), kept in their original order.

    Each document is ranked by sha256(seed, doc_id): the sample does not depend on library versions and a
    document stays in (or out of) the sample when others are added to the corpus.
    """
    pool = _take(docs, None)
    if max_docs is None or len(pool) <= max_docs:
        return pool
    ranked = sorted(range(len(pool)), key=lambda i: hashlib.sha256(repr((seed, pool[i].doc_id)).encode()).digest())
    keep = set(ranked[:max_docs])
    return [doc for i, doc in enumerate(pool) if i in keep]


def _hub_fix(src: _HubSource) -> str:
    return (
        f"run once online to fill the Hugging Face cache (datasets.load_dataset({src.path!r}, {src.config!r}, "
        f"split={src.split!r})), or point the experiment's dataset at a local .txt/.jsonl/.parquet file"
    )


def uncached_hub_sources(sources: list[str]) -> dict[str, str]:
    """Hub sources in `sources` that cannot be loaded here: name -> why, with the fix.

    Offline only (`dataset_cache.offline_load_error`: not in the local Hugging Face datasets cache; with network
    access nothing is checked or fetched), milliseconds per source and no data read, so config validation refuses
    such a source before any model loads. Streamed sources (c4, openwebtext) stream offline only from a cached
    copy too. Other sources are not hub datasets and are not looked at.
    """
    from esa_pipeline.core.evaluation.dataset_cache import describe, offline_load_error

    missing: dict[str, str] = {}
    for name in (s for s in dict.fromkeys(sources) if s in HUB_SOURCES):
        src = HUB_SOURCES[name]
        if (error := offline_load_error(src.path, src.config)) is not None:
            missing[name] = (f"text source {name!r} cannot load its dataset {describe(src.path, src.config)!r} "
                             f"({type(error).__name__}: {error}); offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) "
                             f"only the local Hugging Face datasets cache is used. Fix: {_hub_fix(src)} "
                             "(online: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0)")  # fmt: skip
    return missing


def _load_hub(name: str, src: _HubSource, max_docs: int | None, seed: int) -> list[Document]:
    fix = _hub_fix(src)
    try:
        import datasets
    except ImportError as err:
        raise DatasetUnavailable(f"dataset {name!r} needs the 'datasets' package: pip install datasets") from err
    try:
        rows = datasets.load_dataset(src.path, src.config, split=src.split, streaming=src.streamed)
        if name == "wikitext-103":
            return sample_documents(_wikitext_articles(row["text"] for row in rows), max_docs, seed)
        limit = max_docs if max_docs is not None else DEFAULT_STREAMED_DOCS
        rows = rows.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        # c4 rows carry their url: the document's id wherever it lands in the shuffled stream
        return _take((Document(str(row.get("url") or f"{name}:seed{seed}:{i}"), row["text"])
                      for i, row in enumerate(rows)), limit)  # fmt: skip
    except (ConnectionError, FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DatasetUnavailable(f"dataset {name!r} ({src.path}) is not available: {err}. Fix: {fix}") from err


# A top-level wikitext heading is " = Title = " (subsections use " = = ... = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _wikitext_articles(lines: Iterable[str]) -> Iterable[Document]:
    """Joins wikitext's line records into one document per article."""
    title, body = None, []
    for line in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\n")):
            if title is not None:
                yield Document(f"wikitext-103:{title}", "".join(body))
            title, body = line.strip(" =\n"), [line]
        else:
            body.append(line)
    if title is not None:
        yield Document(f"wikitext-103:{title}", "".join(body))
