"""Executor chosen by ESA_EXECUTOR: multiprocess (default), in_process, or k8s.

`k8s` runs every step as a Kubernetes job (dagster_k8s.k8s_job_executor); model-heavy assets carry op_tags
requesting one `nvidia.com/gpu`, and the `gpu` pool (limit in dagster.yaml) keeps GPU steps from piling up.
"""

from __future__ import annotations

import os

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

EXECUTORS = ("multiprocess", "in_process", "k8s")
# Step processes fork from a server that has already imported torch, transformers and the pipeline: a fresh
# `spawn` would pay that import (~10 s of CPU on 2 cores) for every step instead of once per run.
FORKSERVER_PRELOAD = ["esa_pipeline.definitions", "esa_pipeline.core.models.registry", "esa_pipeline.core.evaluation.sweep"]


def executor_from_env(name: str | None = None) -> ExecutorDefinition:
    choice = (name or os.environ.get("ESA_EXECUTOR") or "multiprocess").strip().lower()
    if choice == "multiprocess":
        # Each step is a process importing torch (~10 s of CPU here): cap concurrency at the core count.
        max_concurrent = int(os.environ.get("ESA_MAX_CONCURRENT") or min(4, os.cpu_count() or 1))
        return multiprocess_executor.configured(
            {"max_concurrent": max_concurrent, "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}},
            name="multiprocess",
        )
    if choice == "in_process":
        return in_process_executor
    if choice == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"ESA_EXECUTOR={choice!r} is not an executor: use one of {', '.join(EXECUTORS)}")
