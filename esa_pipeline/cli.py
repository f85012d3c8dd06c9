"""`esa` command line: validate an experiment, show its partitions, materialize assets, manage the DuckDB views.

    esa validate [--experiment smoke]
    esa plan [--experiment smoke]
    esa materialize [--experiment smoke] [--select sensitivity significance ...] [--no-upstream]
                    [--models tiny-llama ...] [--executor in_process|multiprocess] [--force]
    esa db refresh | esa db path
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from esa_pipeline.core.config import (
    ConfigError,
    experiment_path,
    load_experiment,
    model_plan,
    model_section_hash,
)

# Offline by default (DESIGN §1): datasets makes a telemetry request otherwise. Users with a hub set these to 0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _validate(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.experiment)
    print(f"{experiment_path(args.experiment)}: valid ({cfg.protocol} protocol, {len(cfg.models)} models)")
    for model in cfg.models:
        print(f"  {model}: section hash {model_section_hash(cfg, model)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from esa_pipeline.core.storage import Store
    from esa_pipeline.defs.planning import partition_plan

    cfg = load_experiment(args.experiment)
    for p in partition_plan(cfg, Store()):
        plan = model_plan(cfg, p.model)
        print(f"{p.model} ({p.architecture or 'architecture known after first load'}), hash {p.section_hash}")
        print(f"  sweep partitions: {len(p.variants)} ({', '.join(p.variants)})")
        print("  kinds: " + "; ".join(f"{c}: {'+'.join(plan.kinds_for(c))}" for c in plan.components))
        if p.not_applicable:
            print(f"  not applicable to this architecture: {', '.join(p.not_applicable)}")
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from esa_pipeline.core.storage import Store
    from esa_pipeline.defs.runner import materialize

    started = time.perf_counter()
    summary = materialize(
        experiment=args.experiment,
        select=args.select,
        with_upstream=not args.no_upstream,
        only_models=args.models,
        executor=args.executor,
        force=args.force,
    )
    store = Store()
    runs = len(summary.outcomes)
    print(
        f"\n{runs} runs ({len(summary.failed)} failed) in {time.perf_counter() - started:.0f}s; "
        f"{summary.skipped_up_to_date} steps skipped"
        + (" (--force to recompute)" if summary.skipped_up_to_date else "")
    )
    for reason, n in summary.skipped.items():
        print(f"  skipped {n}: {reason}")
    print(f"results: {store.db_path} (DuckDB views over {store.root})")
    print(f"reports: {store.root.parent / 'reports'}")
    print(f"query:   .venv/bin/python -c \"import duckdb; print(duckdb.connect('{store.db_path}', read_only=True)"
          ".sql('select * from baselines'))\"")
    # A blocked model's root cause is printed once; its downstream assets never ran, so they add no lines.
    for model, why in summary.blocked.items():
        print(f"BLOCKED {model}: {why}", file=sys.stderr)
    for outcome in summary.failed:
        if outcome.partition in summary.blocked:
            continue  # its model's BLOCKED line above is the root cause
        cause = outcome.error or "see the run log (`make dev`)"
        print(f"FAILED: {', '.join(outcome.assets)} [{outcome.partition or 'all models'}]: {cause}", file=sys.stderr)
    return 1 if summary.failed or summary.blocked else 0


def _db(args: argparse.Namespace) -> int:
    from esa_pipeline.core.storage import Store

    store = Store()
    if args.action == "path":
        print(store.db_path)
        return 0
    ok = store.refresh_views(force=True)
    print(f"{'refreshed' if ok else 'could not refresh (database locked by another process)'}: {store.db_path}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esa", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("validate", _validate, "validate an experiment file"),
        ("plan", _plan, "show the partitions an experiment asks for"),
        ("materialize", _materialize, "materialize assets for an experiment"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--experiment", "-e", default=None,
                         help="YAML path or name in data/experiments (default $ESA_EXPERIMENT or smoke)")
        cmd.set_defaults(handler=handler)
        if name == "materialize":
            cmd.add_argument("--select", nargs="+", default=None, help="asset names (default: all)")
            cmd.add_argument("--no-upstream", action="store_true",
                             help="do not add missing/stale upstream assets to the selection")
            cmd.add_argument("--models", nargs="+", default=None, help="only these models of the experiment")
            cmd.add_argument("--executor", choices=["in_process", "multiprocess"], default=None,
                             help="default in_process (one torch import for the whole run)")
            cmd.add_argument("--force", action="store_true",
                             help="recompute partitions whose stored rows are current (default: skip them)")
    db = sub.add_parser("db", help="the DuckDB views file")
    db.add_argument("action", choices=["refresh", "path"])
    db.set_defaults(handler=_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
