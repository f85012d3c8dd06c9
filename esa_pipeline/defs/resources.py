"""Dagster resources: where results are stored and which experiment file is active.

Both default to the environment at use time (ESA_STORE_DIR / ESA_DB_PATH, ESA_EXPERIMENT), so step processes
of the multiprocess and k8s executors resolve the same values as the process that launched them.
"""

from __future__ import annotations

import pathlib

from dagster import ConfigurableResource
from pydantic import Field

from esa_pipeline.core.config import ExperimentConfig, experiment_path, load_experiment
from esa_pipeline.core.storage import Store


class StoreResource(ConfigurableResource):
    """The Parquet store (`<root>/<relation>/<partition>.parquet`) and its DuckDB views file."""

    root: str | None = Field(default=None, description="store directory; default $ESA_STORE_DIR or data/store")
    db_path: str | None = Field(default=None, description="DuckDB file; default $ESA_DB_PATH or <root>/../esa.duckdb")

    def store(self) -> Store:
        return Store(self.root, self.db_path)


class ExperimentResource(ConfigurableResource):
    """The experiment YAML; validated on every load so a broken edit fails loudly before any model work."""

    path: str | None = Field(
        default=None, description="YAML path or name in data/experiments; default $ESA_EXPERIMENT or smoke"
    )

    def file(self) -> pathlib.Path:
        return experiment_path(self.path)

    def load(self) -> ExperimentConfig:
        return load_experiment(self.file())
