"""Provenance: which code and which configuration produced a row, and when.

A result from three months ago is only trustworthy if it names the exact code (`code_version`) and settings
(`config_hash`) behind it. Both are computed here without dagster so notebooks record the same values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import subprocess
from collections.abc import Mapping
from typing import Any

import pandas as pd

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent
# Paths whose content changes the numbers: the code and the bundled inputs it reads.
_TRACKED_INPUTS = ("esa_pipeline", "pyproject.toml", "data/corpus", "data/tasks")


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of a canonical JSON rendering (sorted keys), so equal settings hash equally on any machine."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def source_hash(package_dir: pathlib.Path = PACKAGE_DIR) -> str:
    """Hash of every Python source of the package (path + content), for installs without git."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> str:
    """`<git sha>` for a clean checkout, `<git sha>-dirty.<source hash>` with local edits, `src-<source hash>`
    without git (e.g. a wheel install). The source hash makes two different dirty states distinguishable."""
    sha = _git("rev-parse", "HEAD") if (REPO_ROOT / ".git").exists() else None
    if not sha:
        return f"src-{source_hash()}"
    status = _git("status", "--porcelain", "--", *_TRACKED_INPUTS)
    if status is None or status:
        return f"{sha[:12]}-dirty.{source_hash()[:8]}"
    return sha[:12]


def utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


def provenance_columns(config_hash: str) -> Mapping[str, Any]:
    return {"config_hash": config_hash, "code_version": code_version(), "created_at": utc_now()}
