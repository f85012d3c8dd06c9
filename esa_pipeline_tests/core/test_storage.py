"""The result store: atomic partition rewrites, by-name columns, DuckDB views that never block a run."""

import logging
import os
import subprocess
import sys
import textwrap

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from esa_pipeline.core import storage
from esa_pipeline.core.provenance import code_version, stable_hash
from esa_pipeline.core.storage import Store, StoreError, with_provenance


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store", tmp_path / "esa.duckdb")


def test_columns_are_matched_by_name_and_unioned(store):
    store.write("sensitivity", "a", pd.DataFrame({"model": ["a"], "layer": [0], "delta_nll": [0.5]}))
    # Same columns in another order plus a new one: a positional insert would swap layer and delta_nll.
    store.write("sensitivity", "b", pd.DataFrame({"delta_nll": [0.25], "model": ["b"], "layer": [3], "kl": [0.1]}))
    with store.connect() as con:
        rows = con.sql("SELECT model, layer, delta_nll, kl FROM sensitivity ORDER BY model").df()
    assert rows["layer"].tolist() == [0, 3]
    assert rows["delta_nll"].tolist() == [0.5, 0.25]
    assert pd.isna(rows["kl"].iloc[0]) and rows["kl"].iloc[1] == 0.1


def test_rewriting_a_partition_replaces_only_that_partition(store):
    store.write("baselines", "m1", pd.DataFrame({"model": ["m1", "m1"], "token_ppl": [10.0, 11.0]}))
    store.write("baselines", "m2", pd.DataFrame({"model": ["m2"], "token_ppl": [20.0]}))
    store.write("baselines", "m1", pd.DataFrame({"model": ["m1"], "token_ppl": [12.0]}))
    rows = store.read("baselines").sort_values("model")
    assert rows["token_ppl"].tolist() == [12.0, 20.0]
    assert store.partitions("baselines") == ["m1", "m2"]


def test_failed_rewrite_leaves_previous_rows_and_no_temp_file(store, monkeypatch):
    old = pd.DataFrame({"model": ["m"], "layer": [0], "delta_nll": [0.5]})
    store.write("sensitivity", "m+v", old)
    real_write = pq.write_table

    def write_half_then_fail(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # a partial file exists on disk ...
        raise OSError("disk full")  # ... when the writer dies

    monkeypatch.setattr(storage.pq, "write_table", write_half_then_fail)
    new = pd.DataFrame({"model": ["m"] * 3, "layer": [0, 1, 2], "delta_nll": [9.0, 9.0, 9.0]})
    with pytest.raises(OSError, match="disk full"):
        store.write("sensitivity", "m+v", new)
    monkeypatch.undo()
    assert store.read("sensitivity", "m+v")["delta_nll"].tolist() == [0.5]
    assert sorted(p.name for p in store.relation_dir("sensitivity").iterdir()) == ["m+v.parquet"]


def test_multi_partition_keys_become_portable_file_names(store):
    result = store.write("sensitivity", "tiny-llama|ffn.down__1337", pd.DataFrame({"x": [1]}))
    assert result.path.name == "tiny-llama+ffn.down__1337.parquet"
    assert store.partitions("sensitivity") == ["tiny-llama|ffn.down__1337"]
    with pytest.raises(StoreError, match="cannot be a file name"):
        store.write("sensitivity", "bad name;", pd.DataFrame({"x": [1]}))
    with pytest.raises(StoreError, match="lower_snake_case"):
        store.write("Bad-Relation", "p", pd.DataFrame({"x": [1]}))


def test_empty_partition_keeps_schema_but_frame_without_columns_is_refused(store):
    store.write("moe_routing", "dense", pd.DataFrame({"model": pd.Series(dtype=str), "layer": pd.Series(dtype="Int64")}))
    assert store.read("moe_routing").columns.tolist() == ["model", "layer"]
    with pytest.raises(StoreError, match="without columns"):
        store.write("moe_routing", "dense", pd.DataFrame())


def test_read_filters_by_column_and_names_the_fix_when_empty(store):
    store.write("sensitivity", "a", pd.DataFrame({"model": ["a", "a"], "config_hash": ["h1", "h2"]}))
    assert len(store.read("sensitivity", model="a", config_hash="h2")) == 1
    with pytest.raises(FileNotFoundError, match="materialize it first"):
        store.read("significance")


def _hold_database(db_path, mode: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db_path)!r}, read_only={mode == "read"})
        print("held", flush=True)
        sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("mode", ["read", "write"])
def test_writes_succeed_while_another_process_holds_the_database(store, monkeypatch, caplog, mode):
    monkeypatch.setattr(storage, "_LOCK_RETRY_DELAY_S", 0.01)
    store.write("baselines", "m1", pd.DataFrame({"model": ["m1"], "token_ppl": [10.0]}))  # view exists now
    holder = _hold_database(store.db_path, mode)
    try:
        with caplog.at_level(logging.WARNING, logger=storage.__name__):
            done = store.write("baselines", "m2", pd.DataFrame({"model": ["m2"], "token_ppl": [20.0]}))
            # A relation without a view yet cannot get one while the lock is held: warned, not raised.
            first = store.write("zero_shot", "m2", pd.DataFrame({"model": ["m2"], "value": [0.5]}))
        assert done.rows == 1 and done.path.exists()
        assert first.path.exists() and not first.views_refreshed
        assert "esa db refresh" in caplog.text
    finally:
        holder.communicate("\n", timeout=30)
    # The existing glob view already covered the new file; the missing view appears on the next refresh.
    assert store.refresh_views() is True
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM baselines").fetchone()[0] == 2
        assert con.execute("SELECT value FROM zero_shot").fetchone()[0] == 0.5


def test_views_are_created_once_and_see_later_files_and_columns(store):
    store.write("critical_layers", "a", pd.DataFrame({"model": ["a"], "rank": [1]}))
    mtime = os.stat(store.db_path).st_mtime_ns
    store.write("critical_layers", "b", pd.DataFrame({"model": ["b"], "rank": [2], "depth": [0.5]}))
    assert os.stat(store.db_path).st_mtime_ns == mtime  # no write to the database for a known relation
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        assert con.execute("SELECT sum(rank), max(depth) FROM critical_layers").fetchone() == (3, 0.5)


def test_with_provenance_stamps_every_row():
    df = with_provenance(pd.DataFrame({"x": [1, 2]}), "abc123")
    assert df["config_hash"].tolist() == ["abc123", "abc123"]
    assert (df["code_version"] == code_version()).all() and code_version()
    assert str(df["created_at"].dt.tz) == "UTC"


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


# ---- issue 15 item 6: no SQL reserved words as column names; files from before a rename stay readable ---------
def test_reserved_word_columns_are_refused_with_the_fix(store):
    with pytest.raises(StoreError, match=r"\['window'\] are SQL reserved words.*window -> window_tokens"):
        store.write("baselines", "m", pd.DataFrame({"model": ["m"], "window": [64]}))
    assert not store.has("baselines")


def test_old_window_column_is_read_as_window_tokens_through_view_and_read(store):
    # A file written before the rename (column `window`), beside one written now (`window_tokens`).
    old = pd.DataFrame({"model": ["old"], "dataset": ["bundled"], "window": [64], "token_ppl": [12.0]})
    store.relation_dir("baselines").mkdir(parents=True)
    old.to_parquet(store.partition_path("baselines", "old"))
    store.write("baselines", "new", pd.DataFrame({"model": ["new"], "dataset": ["bundled"], "window_tokens": [128],
                                                  "token_ppl": [11.0]}))  # fmt: skip
    with store.connect() as con:
        rows = con.sql("select model, window_tokens from baselines order by model").fetchall()
        columns = [d[0] for d in con.sql("from baselines").description]
    assert rows == [("new", 128), ("old", 64)]
    assert "window" not in columns
    read = store.read("baselines", model="old")
    assert read["window_tokens"].tolist() == [64] and "window" not in read.columns
    assert store.read("baselines", "old")["window_tokens"].tolist() == [64]
    # only old files / only new files: the view still binds
    assert store.read("baselines", "new")["window_tokens"].tolist() == [128]


def test_views_made_before_a_rename_are_recreated(store):
    store.write("baselines", "m", pd.DataFrame({"model": ["m"], "window_tokens": [64]}))
    with duckdb.connect(str(store.db_path)) as con:  # the view as older code created it
        con.execute(f"CREATE OR REPLACE VIEW baselines AS SELECT * FROM read_parquet('{store._glob('baselines')}', "
                    "union_by_name=true)")  # fmt: skip
    assert "baselines" not in (store.existing_views() or set())
    with store.connect() as con:
        assert con.sql("select window_tokens from baselines").fetchall() == [(64,)]


# ---- issue 15 item 4: a partition reads only its own files; killed writers' temp files are cleaned up ---------
def test_reading_one_models_partitions_ignores_a_damaged_file_of_another_model(store):
    frame = pd.DataFrame({"model": ["tiny-llama"], "delta_nll": [0.5]})
    store.write("sensitivity", "tiny-llama|ffn.down__1", frame)
    store.write("sensitivity", "tiny-llama|ffn.up__1", frame.assign(delta_nll=0.25))
    store.write("sensitivity", "tiny-llama-2|ffn.up__1", frame.assign(model="tiny-llama-2"))
    store.partition_path("sensitivity", "smollm2-135m|ffn.down__1").write_bytes(b"PAR1 not parquet")
    with pytest.raises(duckdb.Error):
        store.read("sensitivity", model="tiny-llama")  # the whole glob opens the damaged file
    assert store.model_partitions("sensitivity", "tiny-llama") == ["tiny-llama|ffn.down__1", "tiny-llama|ffn.up__1"]
    rows = store.read("sensitivity", partitions=store.model_partitions("sensitivity", "tiny-llama"))
    assert sorted(rows["delta_nll"]) == [0.25, 0.5]
    with pytest.raises(FileNotFoundError, match="materialize them first"):
        store.read("sensitivity", partitions=["absent|x__1"])


def test_temp_files_of_killed_writers_are_removed_and_never_read(store, monkeypatch):
    store.write("baselines", "m", pd.DataFrame({"model": ["m"], "token_ppl": [10.0]}))
    directory = store.relation_dir("baselines")
    host = storage.socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pd.DataFrame({"model": ["x"], "token_ppl": [1.0]}).to_parquet(
        stale_here := directory / f"m.parquet.tmp-{host}-{dead.pid}-0123abcd"
    )
    alive_here = directory / f"m.parquet.tmp-{host}-{os.getpid()}-0123abce"
    other_host_young = directory / "m.parquet.tmp-gpu-node-7-4242-0123abcf"
    other_host_old = directory / "m.parquet.tmp-gpu-node-7-4243-0123abd0"
    for path in (alive_here, other_host_young, other_host_old):
        path.write_bytes(stale_here.read_bytes())
    os.utime(other_host_old, (1, 1))
    assert storage.temp_owner(other_host_old) == ("gpu-node-7", 4243)
    # never globbed: the views and reads see only the committed partition
    with store.connect() as con:
        assert con.sql("select model from baselines").fetchall() == [("m",)]
    assert store.partitions("baselines") == ["m"]
    # this process is alive, a writer on another host is only judged by age
    removed = store.remove_stale_temp_files("baselines")
    assert sorted(p.name for p in removed) == sorted([stale_here.name, other_host_old.name])
    assert alive_here.exists() and other_host_young.exists()
    # `esa db refresh` (a forced refresh) cleans up too
    other_host_old.write_bytes(b"PAR1 half a file")
    os.utime(other_host_old, (1, 1))
    assert store.refresh_views(force=True) and not other_host_old.exists() and other_host_young.exists()
    # the next write cleans up by itself; a live local writer's file is kept whatever its age
    monkeypatch.setenv("ESA_TEMP_MAX_AGE_S", "0")
    os.utime(alive_here, (1, 1))
    store.write("baselines", "m2", pd.DataFrame({"model": ["m2"], "token_ppl": [10.0]}))
    assert sorted(p.name for p in directory.iterdir()) == ["m.parquet", alive_here.name, "m2.parquet"]
