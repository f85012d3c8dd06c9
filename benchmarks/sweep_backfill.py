"""Model loads and wall time of a backfill of one model's sweep partitions: one run per partition (before
BackfillPolicy.multi_run) vs one run over the model's range of partitions (now).

    .venv/bin/python benchmarks/sweep_backfill.py --model tiny-llama --executor multiprocess

Uses the smoke experiment's settings for the model, a temporary store and a temporary Dagster instance; the
model stage is not run (sweep partitions compute their own baseline). Loads are counted by the step processes
themselves (`process_model_loads` metadata): with the multiprocess executor each run's step is a new process.
Each line also splits the wall time into the points' own evaluation time (sum of the stored rows' `elapsed_s`)
and the rest (process start, model loads, baselines, prefix caches, Dagster): on a shared machine the point time
moves with the load, while the rest is what one run per model saves.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--executor", choices=["in_process", "multiprocess"], default="multiprocess")
    parser.add_argument("--experiment", default="smoke")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="esa-bench-")
    os.environ.update(ESA_STORE_DIR=f"{tmp}/store", DAGSTER_HOME=tmp, ESA_EXPERIMENT=args.experiment)
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    from esa_pipeline.core.config import load_experiment
    from esa_pipeline.core.storage import Store
    from esa_pipeline.defs.loaded import forget_models
    from esa_pipeline.defs.partitions import VARIANT_DIMENSION, contiguous_ranges, sweep_key
    from esa_pipeline.defs.planning import partition_plan, register_partitions
    from esa_pipeline.defs.runner import run_partition

    cfg = load_experiment(args.experiment)
    with DagsterInstance.get() as instance:
        plan = next(p for p in partition_plan(cfg, Store()) if p.model == args.model)
        register_partitions([plan], instance)
        order = instance.get_dynamic_partitions(VARIANT_DIMENSION)

        def loads_since(storage_id: int) -> tuple[int, int]:
            records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("sensitivity"),
                                                                         after_storage_id=storage_id), limit=1000).records
            by_run: dict[str, int] = {}
            for r in records:
                value = r.event_log_entry.asset_materialization.metadata.get("process_model_loads")
                by_run[r.run_id] = max(by_run.get(r.run_id, 0), int(value.value))
            return sum(by_run.values()), max((r.storage_id for r in records), default=storage_id)

        cursor = 0
        for label, runs in (
            ("one run per partition", [(v, v) for v in plan.variants]),
            ("one run per model (range)", contiguous_ranges(plan.variants, order)),
        ):
            forget_models()
            started = time.perf_counter()
            for first, last in runs:
                ok, error = run_partition(instance, "esa_sweep", ["sensitivity"], sweep_key(args.model, first),
                                          args.executor, sweep_key(args.model, last))
                assert ok, error
            seconds = time.perf_counter() - started
            loads, cursor = loads_since(cursor)
            point_s = float(Store().read("sensitivity", model=args.model)["elapsed_s"].sum())
            if args.executor == "in_process":
                loads = f"{loads} (cumulative in this process)"
            print(f"{args.model} [{args.executor}] {label}: {len(plan.variants)} partitions, {len(runs)} runs, "
                  f"model loads {loads}, {seconds:.1f} s = points {point_s:.1f} s + rest {seconds - point_s:.1f} s, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
