"""Result store: one atomic Parquet file per relation and partition, exposed in DuckDB as views.

Why not a DuckDB table per relation (DESIGN §7): DELETE+INSERT of a partition is not atomic, positional inserts
swap columns silently, and a single writer lock makes runs fail while anyone has the database open. Here
  - a partition's rewrite is one `os.replace` of a fully written temp file in the same directory (atomic on POSIX),
  - columns are matched by name on read (`read_parquet(..., union_by_name=true)`), so order never matters,
  - concurrent partitions write different files and cannot lose each other's rows,
  - `data/esa.duckdb` only holds views over the Parquet globs; if another process holds the database lock the
    view refresh is skipped with a warning — the existing glob view already covers the new file.
  - a temp file is named `<partition>.parquet.tmp-<host>-<pid>-<random>`: never matched by the `*.parquet` glob,
    and removable once its writer is gone (`remove_stale_temp_files`: a dead pid on this host, or any writer
    older than `ESA_TEMP_MAX_AGE_S`, default one hour, far longer than writing one Parquet file takes).
  - column names are never SQL reserved words (`select window from ...` is a syntax error). A column renamed for
    that reason keeps its old name in files written before the rename; the views and `read` map it to the new
    name (`RENAMED_COLUMNS`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import socket
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
# Old name -> new name per relation, for columns renamed because the old name is an SQL reserved word.
RENAMED_COLUMNS: dict[str, dict[str, str]] = {
    "baselines": {"window": "window_tokens"},
    "baseline_windows": {"window": "window_tokens"},
    "sensitivity": {"window": "window_tokens"},
}
_TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^(?P<target>.+\.parquet)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{8})$")
DEFAULT_TEMP_MAX_AGE_S = 3600.0


class StoreError(ValueError):
    """Bad relation/partition name or an unwritable frame; the message names the fix."""


def default_store_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ESA_STORE_DIR") or REPO_ROOT / "data" / "store").resolve()


def default_db_path(store_root: pathlib.Path | None = None) -> pathlib.Path:
    """`ESA_DB_PATH`, else `esa.duckdb` beside the store directory (data/store -> data/esa.duckdb)."""
    if os.environ.get("ESA_DB_PATH"):
        return pathlib.Path(os.environ["ESA_DB_PATH"]).resolve()
    return (store_root or default_store_root()).parent / "esa.duckdb"


def reserved_words() -> frozenset[str]:
    """DuckDB's reserved keywords (lower case): not usable as bare column names."""
    global _RESERVED
    if _RESERVED is None:
        with duckdb.connect() as con:
            rows = con.execute("SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category = 'reserved'")
            _RESERVED = frozenset(name.lower() for (name,) in rows.fetchall())
    return _RESERVED


_RESERVED: frozenset[str] | None = None


def relation_select(relation: str, source_sql: str) -> str:
    """SELECT over `source_sql` (a read_parquet call) that exposes renamed columns under their new names only.

    Files of both vintages are unioned by name: a row has the old column or the new one, so coalescing the two
    yields the value. An empty `UNION ALL BY NAME` row set guarantees both names exist whichever files matched.
    """
    renamed = RENAMED_COLUMNS.get(relation)
    if not renamed:
        return f"SELECT * FROM {source_sql}"
    names = sorted({*renamed, *renamed.values()})
    both = ", ".join(f'NULL AS "{n}"' for n in names)
    kept = ", ".join(f"'{n}'" for n in names)
    merged = ", ".join(f'coalesce("{new}", "{old}") AS "{new}"' for old, new in renamed.items())
    return (
        f"SELECT COLUMNS(lambda c: c NOT IN ({kept})), {merged} "
        f"FROM (FROM {source_sql} UNION ALL BY NAME SELECT {both} WHERE false)"
    )


def temp_owner(path: pathlib.Path) -> tuple[str, int] | None:
    """(host, pid) of the writer of a store temp file, None for any other file."""
    match = _TEMP_NAME.match(path.name)
    return (match["host"], int(match["pid"])) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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

    def _temp_path(self, target: pathlib.Path) -> pathlib.Path:
        host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
        return target.with_name(f"{target.name}{_TEMP_MARK}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

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
        reserved = [str(c) for c in df.columns if str(c).lower() in reserved_words()]
        if reserved:
            raise StoreError(
                f"{relation}/{partition}: columns {reserved} are SQL reserved words (a query naming them fails); "
                "rename them, e.g. window -> window_tokens"
            )
        target = self.partition_path(relation, partition)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files(relation)
        table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
        tmp = self._temp_path(target)
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        refreshed = self.refresh_views([relation]) if refresh_views else False
        return WriteResult(relation, partition, target, len(df), refreshed)

    def remove_stale_temp_files(self, relation: str, max_age_s: float | None = None) -> list[pathlib.Path]:
        """Delete temp files whose writer was killed: written on this host by a pid that no longer runs, or on
        another host (its pid cannot be checked here) and older than `max_age_s` (default `ESA_TEMP_MAX_AGE_S`,
        else one hour). A live local writer's temp file is never touched. Returns the removed paths.
        """
        if max_age_s is None:
            max_age_s = float(os.environ.get("ESA_TEMP_MAX_AGE_S") or DEFAULT_TEMP_MAX_AGE_S)
        directory = self.relation_dir(relation)
        if not directory.is_dir():
            return []
        host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
        removed = []
        now = time.time()
        for path in directory.glob(f"*{_TEMP_MARK}*"):
            owner = temp_owner(path)
            if owner is None:
                continue
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            # On this host the pid says whether the writer lives; elsewhere only the age can tell.
            gone = not _pid_alive(owner[1]) if owner[0] == host else age > max_age_s
            if gone:
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("removed %s, left by a killed writer (host %s, pid %d)", path, *owner)
        return removed

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

    def model_partitions(self, relation: str, model: str) -> list[str]:
        """Stored partitions of `relation` that belong to `model`: `model` itself and every `model|<variant>`."""
        return [p for p in self.partitions(relation) if p == model or p.startswith(f"{model}|")]

    def has(self, relation: str, partition: str | None = None) -> bool:
        if partition is None:
            return any(self.relation_dir(relation).glob("*.parquet"))
        return self.partition_path(relation, partition).exists()

    def read(
        self, relation: str, partition: str | None = None, *, partitions: list[str] | None = None, **equals: object
    ) -> pd.DataFrame:
        """Rows of one partition, of several (`partitions`, only these files are opened), or of the whole
        relation, with columns unioned by name and renamed columns under their new names.

        Keyword filters keep rows whose column equals the value (`read("sensitivity", model="tiny-llama")`).
        Raises FileNotFoundError naming the fix when nothing is stored yet.
        """
        if partitions is not None:
            if partition is not None:
                raise StoreError("pass either partition= or partitions=, not both")
            sources = [str(self.partition_path(relation, p)) for p in partitions if self.has(relation, p)]
            if not sources:
                raise FileNotFoundError(
                    f"no stored rows for partitions {partitions} of {relation!r} under {self.root}; materialize them first"
                )
            source: str | list[str] = sources
        elif not self.has(relation, partition):
            what = f"partition {partition!r} of {relation!r}" if partition is not None else f"{relation!r}"
            raise FileNotFoundError(f"no stored rows for {what} under {self.root}; materialize it first")
        else:
            source = str(self.partition_path(relation, partition)) if partition is not None else self._glob(relation)
        for column in equals:
            if not _RELATION_NAME.match(column):
                raise StoreError(f"filter column {column!r} must be lower_snake_case")
        where = " AND ".join(f'"{column}" = ${column}' for column in equals)
        sql = f"SELECT * FROM ({relation_select(relation, 'read_parquet($source, union_by_name=true)')})"
        sql += f" WHERE {where}" if where else ""
        params = {"source": source, **equals}
        with duckdb.connect() as con:
            return con.execute(sql, params).df()

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
        return {name for name, sql in rows if _RELATION_NAME.match(name) and self._view_is_current(name, sql or "")}

    def _view_is_current(self, relation: str, sql: str) -> bool:
        """The view reads this store's glob and exposes renamed columns (views made before a rename do not)."""
        renamed = RENAMED_COLUMNS.get(relation, {}).values()
        return self._glob(relation) in sql and all(new in sql for new in renamed)

    def refresh_views(self, relations: list[str] | None = None, *, force: bool = False) -> bool:
        """Create the view of each relation that has files but no view yet (all of them with `force`).

        Views bind their columns at query time, so one creation per relation is enough: later files, with
        new columns too, show up by themselves. Returns False when another process holds the database
        lock; that is logged, not raised — the rows are in Parquet and the next refresh adds the view.
        A forced refresh (`esa db refresh`) also removes the temp files of killed writers.
        """
        names = self.relations() if relations is None else [r for r in relations if self.has(r)]
        if force:
            for relation in names:
                self.remove_stale_temp_files(relation)
        else:
            present = self.existing_views()
            names = [r for r in names if present is None or r not in present]
        if not names:
            return True
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(_LOCK_RETRIES):
            try:
                with duckdb.connect(str(self.db_path)) as con:
                    for relation in names:
                        source = f"read_parquet('{self._glob(relation)}', union_by_name=true)"
                        con.execute(f'CREATE OR REPLACE VIEW "{relation}" AS {relation_select(relation, source)}')
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
