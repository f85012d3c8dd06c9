"""Result store: one atomic Parquet file per relation and partition, exposed in DuckDB as views.

Why not a DuckDB table per relation (DESIGN §7): DELETE+INSERT of a partition is not atomic, positional inserts
swap columns silently, and a single writer lock makes runs fail while anyone has the database open. Here
  - a partition's rewrite is one `os.replace` of a fully written temp file in the same directory (atomic on POSIX),
  - columns are matched by name on read (`read_parquet(..., union_by_name=true)`), so order never matters,
  - concurrent partitions write different files and cannot lose each other's rows,
  - `data/esa.duckdb` only holds views over the Parquet globs; if another process holds the database lock the
    view refresh is skipped with a warning — the existing glob view already covers the new file.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time
import uuid
from dataclasses import dataclass

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esa_pipeline.core.provenance import REPO_ROOT, provenance_columns

log = logging.getLogger(__name__)

PROVENANCE_COLUMNS = ("config_hash", "code_version", "created_at")
_RELATION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
UNPARTITIONED = "all"
_LOCK_RETRIES = 5
_LOCK_RETRY_DELAY_S = 0.2


class StoreError(ValueError):
    """Bad relation/partition name or an unwritable frame; the message names the fix."""


def default_store_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ESA_STORE_DIR") or REPO_ROOT / "data" / "store").resolve()


def default_db_path(store_root: pathlib.Path | None = None) -> pathlib.Path:
    """`ESA_DB_PATH`, else `esa.duckdb` beside the store directory (data/store -> data/esa.duckdb)."""
    if os.environ.get("ESA_DB_PATH"):
        return pathlib.Path(os.environ["ESA_DB_PATH"]).resolve()
    return (store_root or default_store_root()).parent / "esa.duckdb"


def with_provenance(df: pd.DataFrame, config_hash: str) -> pd.DataFrame:
    """Copy of `df` with config_hash, code_version and created_at (UTC) on every row."""
    out = df.copy()
    for column, value in provenance_columns(config_hash).items():
        out[column] = value
    return out


def partition_file_stem(partition: str) -> str:
    """Dagster multi-partition keys join dimensions with '|'; stored as '+' to keep file names portable."""
    stem = partition.replace("|", "+").replace("/", "--")
    if not _PARTITION_NAME.match(stem):
        raise StoreError(
            f"partition {partition!r} cannot be a file name; use letters, digits and . _ - + = @ only"
        )
    return stem


@dataclass(frozen=True)
class WriteResult:
    relation: str
    partition: str
    path: pathlib.Path
    rows: int
    views_refreshed: bool


class Store:
    """Parquet files under `root/<relation>/<partition>.parquet`, DuckDB views in `db_path`."""

    def __init__(self, root: pathlib.Path | str | None = None, db_path: pathlib.Path | str | None = None):
        self.root = pathlib.Path(root).resolve() if root else default_store_root()
        self.db_path = pathlib.Path(db_path).resolve() if db_path else default_db_path(self.root)

    # ---- paths -------------------------------------------------------------------------------------
    def relation_dir(self, relation: str) -> pathlib.Path:
        if not _RELATION_NAME.match(relation):
            raise StoreError(f"relation name {relation!r} must be lower_snake_case (it becomes a SQL view name)")
        return self.root / relation

    def partition_path(self, relation: str, partition: str = UNPARTITIONED) -> pathlib.Path:
        return self.relation_dir(relation) / f"{partition_file_stem(partition)}.parquet"

    def _glob(self, relation: str) -> str:
        return str(self.relation_dir(relation) / "*.parquet")

    # ---- writing -----------------------------------------------------------------------------------
    def write(self, relation: str, partition: str, df: pd.DataFrame, *, refresh_views: bool = True) -> WriteResult:
        """Atomically replace one partition of a relation with `df` (zero rows allowed, zero columns not).

        The frame is written completely to a temp file in the same directory, fsynced, then renamed over the
        old file; a failure at any point leaves the previous rows untouched and removes the temp file.
        """
        if df.columns.empty:
            raise StoreError(f"{relation}/{partition}: a frame without columns cannot be stored; pass its schema")
        if df.columns.duplicated().any():
            dupes = sorted(set(df.columns[df.columns.duplicated()]))
            raise StoreError(f"{relation}/{partition}: duplicate columns {dupes}; rename them before storing")
        target = self.partition_path(relation, partition)
        target.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        refreshed = self.refresh_views([relation]) if refresh_views else False
        return WriteResult(relation, partition, target, len(df), refreshed)

    def delete(self, relation: str, partition: str) -> bool:
        """Remove one partition's file; returns whether it existed."""
        path = self.partition_path(relation, partition)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    # ---- reading (never touches the database file, so it never waits on its lock) ------------------
    def relations(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))

    def partitions(self, relation: str) -> list[str]:
        return sorted(p.stem.replace("+", "|") for p in self.relation_dir(relation).glob("*.parquet"))

    def has(self, relation: str, partition: str | None = None) -> bool:
        if partition is None:
            return any(self.relation_dir(relation).glob("*.parquet"))
        return self.partition_path(relation, partition).exists()

    def read(self, relation: str, partition: str | None = None, **equals: object) -> pd.DataFrame:
        """Rows of one partition, or of the whole relation with columns unioned by name.

        Keyword filters keep rows whose column equals the value (`read("sensitivity", model="tiny-llama")`).
        Raises FileNotFoundError naming the fix when nothing is stored yet.
        """
        if not self.has(relation, partition):
            what = f"partition {partition!r} of {relation!r}" if partition is not None else f"{relation!r}"
            raise FileNotFoundError(f"no stored rows for {what} under {self.root}; materialize it first")
        source = str(self.partition_path(relation, partition)) if partition is not None else self._glob(relation)
        for column in equals:
            if not _RELATION_NAME.match(column):
                raise StoreError(f"filter column {column!r} must be lower_snake_case")
        where = " AND ".join(f'"{column}" = ?' for column in equals)
        sql = "SELECT * FROM read_parquet(?, union_by_name=true)" + (f" WHERE {where}" if where else "")
        with duckdb.connect() as con:
            return con.execute(sql, [source, *equals.values()]).df()

    # ---- DuckDB views ------------------------------------------------------------------------------
    def existing_views(self) -> set[str] | None:
        """Relations whose view reads this store's glob; None when the database is missing or write-locked."""
        if not self.db_path.exists():
            return None
        try:
            with duckdb.connect(str(self.db_path), read_only=True) as con:
                rows = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()
        except duckdb.IOException:
            return None
        return {name for name, sql in rows if _RELATION_NAME.match(name) and self._glob(name) in (sql or "")}

    def refresh_views(self, relations: list[str] | None = None, *, force: bool = False) -> bool:
        """Create the view of each relation that has files but no view yet (all of them with `force`).

        Views bind their columns at query time, so one creation per relation is enough: later files, with
        new columns too, show up by themselves. Returns False when another process holds the database
        lock; that is logged, not raised — the rows are in Parquet and the next refresh adds the view.
        """
        names = self.relations() if relations is None else [r for r in relations if self.has(r)]
        if not force:
            present = self.existing_views()
            names = [r for r in names if present is None or r not in present]
        if not names:
            return True
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(_LOCK_RETRIES):
            try:
                with duckdb.connect(str(self.db_path)) as con:
                    for relation in names:
                        con.execute(
                            f'CREATE OR REPLACE VIEW "{relation}" AS SELECT * FROM '
                            f"read_parquet('{self._glob(relation)}', union_by_name=true)"
                        )
                return True
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                if attempt + 1 < _LOCK_RETRIES:
                    time.sleep(_LOCK_RETRY_DELAY_S * (attempt + 1))
                    continue
                log.warning(
                    "DuckDB file %s is held by another process: rows for %s are stored in Parquet, but the "
                    "view(s) could not be created now; run `esa db refresh` once it is released: %s",
                    self.db_path,
                    ", ".join(names),
                    exc,
                )
        return False

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """Connection to the views database (read-only by default so analysis never blocks runs)."""
        self.refresh_views()
        return duckdb.connect(str(self.db_path), read_only=read_only)
