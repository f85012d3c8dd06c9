"""A tiny experiment (two random-weight models, 2 layers, 64 tokens) and a temporary store per test."""

import pathlib
from dataclasses import dataclass

import pytest

from esa_pipeline.core.storage import Store

TINY_EXPERIMENT = """\
protocol: smoke
datasets: [bundled]
window: 32
token_budget: 64
batch_size: 2
seeds: [1, 2]
strengths: {gaussian: [0.1], neurons: [0.25], scale: [1.1]}
components: [attention.query, ffn.gate]
layers: [0, 1]
importance: {metrics: [magnitude], top_k: 2, token_budget: 32}
models:
  tiny-llama: {}
  tiny-pythia: {}
"""


@dataclass
class EsaEnv:
    experiment: pathlib.Path
    store: Store

    def edit(self, old: str, new: str) -> None:
        text = self.experiment.read_text()
        assert old in text, f"{old!r} not in the experiment"
        self.experiment.write_text(text.replace(old, new))


@pytest.fixture
def esa_env(tmp_path, monkeypatch) -> EsaEnv:
    """Env vars point every resource (also in step subprocesses) at a temporary experiment and store."""
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(TINY_EXPERIMENT)
    monkeypatch.setenv("ESA_EXPERIMENT", str(experiment))
    monkeypatch.setenv("ESA_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.delenv("ESA_DB_PATH", raising=False)
    monkeypatch.delenv("ESA_EXECUTOR", raising=False)
    return EsaEnv(experiment, Store(tmp_path / "store"))
