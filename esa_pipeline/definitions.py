"""The dagster code location (`workspace.yaml`, `[tool.dagster]` in pyproject.toml)."""

from esa_pipeline.defs import build_definitions

defs = build_definitions()
