"""PyTorch `.bin` / `.pt` checkpoints written by `torch.save`, read by byte range."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from formats_helpers import (
    as_bin,
    assert_fingerprint_cli_refuses,
    assert_same_stats,
    fingerprint_rows,
)
from safetensors.torch import load_file, save_file

from npu_fp.activations import run_activations
from npu_fp.config import ActivationsConfig
from npu_fp.device import resolve_device
from npu_fp.dist import DistContext
from npu_fp.io.reader import FileCache, RowReader
from npu_fp.io.safetensors_header import CheckpointError
from npu_fp.io.source import open_model

FIXTURES = Path(__file__).parent / "fixtures" / "mindspore"


@pytest.mark.parametrize("name", ["llama_fp32_crc", "llama_bf16_meta", "llama_fp16_sliced"])
@pytest.mark.parametrize("shards", [1, 3])
def test_bin_statistics_agree_exactly_with_safetensors(
    name: str, shards: int, tmp_path: Path
) -> None:
    st = FIXTURES / f"{name}_safetensors"
    b = as_bin(st, tmp_path / "bin", shards)
    assert len(open_model(b).files) == shards
    assert_same_stats(fingerprint_rows(b, tmp_path / "o1"), fingerprint_rows(st, tmp_path / "o2"))


def test_views_tied_weights_and_other_dtypes_read_exactly(tmp_path: Path) -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    sd = {
        "tail": base[2:],  # a view with a storage offset
        "tied": base,  # shares the storage with `tail`
        "param": torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64)),
        "u16": torch.arange(60000, 60010).to(torch.uint16),
        "f8": torch.linspace(-1, 1, 12).to(torch.float8_e4m3fn).reshape(3, 4),
        "empty": torch.zeros(0, 4),
    }
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"state_dict": sd, "step": 7}, d / "model.pt")
    src = open_model(d)
    assert sorted(src.tensors) == sorted(f"state_dict.{n}" for n in sd)  # `step` is no tensor
    with FileCache() as files:
        reader = RowReader(files)
        for n, t in sd.items():
            ref = src.tensors[f"state_dict.{n}"]
            got = reader.read(ref, 0, ref.rows).reshape(t.shape)
            assert got.view(torch.uint8).equal(t.detach().contiguous().view(torch.uint8)), n
    assert src.tensors["state_dict.tail"].begin == src.tensors["state_dict.tied"].begin + 64


# --- bad input -------------------------------------------------------------------------------


class _CreateFile:
    """Pickles as a call that would create a file (a real attack payload)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """What the refusals below guard against: a plain unpickle creates the file."""
    pickle.loads(pickle.dumps(_CreateFile(tmp_path / "made"), protocol=2)).close()
    assert (tmp_path / "made").exists()


def _zip_with_pickle(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _malicious_open(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    payload = pickle.dumps({"w": _CreateFile(tmp_path / "PWNED")}, protocol=2)
    _zip_with_pickle(d / "pytorch_model.bin", payload)
    return d


def _malicious_import(tmp_path: Path) -> Path:
    """A global in a module that is importable from the model folder and creates a file."""
    d = _model_dir(tmp_path)
    (d / "evil_ckpt_module.py").write_text(
        f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\ndef run():\n    pass\n"
    )
    payload = b"\x80\x02}q\x00X\x01\x00\x00\x00wcevil_ckpt_module\nrun\n)Rs."
    _zip_with_pickle(d / "pytorch_model.bin", payload)
    return d


def _deep_nesting(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    # {"x": {"x": ... {"w": 1}}} 10,000 deep, as opcodes (pickle.dumps itself recurses)
    key = b"X\x01\x00\x00\x00"
    depth = 10_000
    payload = b"\x80\x02" + (b"}" + key + b"x") * depth + b"}" + key + b"wK\x01s" + b"s" * depth
    _zip_with_pickle(d / "pytorch_model.bin", payload + b".")
    return d


def _legacy(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return d


def _truncated(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    f = d / "pytorch_model.bin"
    torch.save({"w": torch.ones(64, 64)}, f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _corrupt_pickle(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    f = d / "pytorch_model.bin"
    torch.save({"w": torch.ones(4)}, f)
    data = f.read_bytes()
    at = data.index(b"_rebuild_tensor_v2")
    f.write_bytes(data[:at] + b"\xff" * 18 + data[at + 18 :])  # garbage where the name was
    return d


def _non_contiguous(tmp_path: Path) -> Path:
    d = _model_dir(tmp_path)
    torch.save({"w.weight": torch.ones(4, 6).t()}, d / "pytorch_model.bin")
    return d


def _short_storage(tmp_path: Path) -> Path:
    """A storage entry that holds fewer bytes than the tensor rebuilt from it needs."""
    d = _model_dir(tmp_path)
    f = d / "pytorch_model.bin"
    torch.save({"w.weight": torch.ones(8)}, f)
    with zipfile.ZipFile(f) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    key = next(n for n in entries if n.endswith("/data/0"))
    entries[key] = entries[key][:16]
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for n, b in entries.items():
            z.writestr(n, b)
    return d


def _mixed(tmp_path: Path) -> Path:
    """A .bin model beside a safetensors file that is not a model's (no index, no
    model.safetensors): not a complete set, so nothing says which one to read."""
    d = as_bin(FIXTURES / "llama_fp32_crc_safetensors", tmp_path / "model")
    shutil.copy(
        FIXTURES / "llama_fp32_crc_safetensors" / "model.safetensors", d / "adapter.safetensors"
    )
    return d


def _sharded_st_beside_bin(tmp_path: Path, drop_shard: bool = False) -> Path:
    """A Hugging Face repo layout: a sharded safetensors set and a sharded .bin set together."""
    src = FIXTURES / "llama_fp32_crc_safetensors"
    d = as_bin(src, tmp_path / "model", shards=2)
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    weight_map = {}
    for i in range(2):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {n: sd[n] for n in names[i::2]}
        save_file(part, str(d / fname))
        weight_map |= dict.fromkeys(part, fname)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if drop_shard:
        (d / "model-00002-of-00002.safetensors").unlink()
    return d


def _incomplete_st_beside_bin(tmp_path: Path) -> Path:
    return _sharded_st_beside_bin(tmp_path, drop_shard=True)


BAD: dict[str, tuple[object, list[str]]] = {
    "pickle calls open": (_malicious_open, ["pytorch_model.bin", "io.open", "nothing it names"]),
    "pickle names a module": (
        _malicious_import,
        ["pytorch_model.bin", "evil_ckpt_module.run", "was imported or run"],
    ),
    "deep nesting": (_deep_nesting, ["pytorch_model.bin", "nested deeper than 64"]),
    "legacy format": (_legacy, ["pytorch_model.bin", "legacy", "convert it"]),
    "truncated": (_truncated, ["pytorch_model.bin", "truncated or corrupt"]),
    "corrupt pickle": (_corrupt_pickle, ["pytorch_model.bin", "pickle"]),
    "non-contiguous view": (_non_contiguous, ["tensor 'w.weight'", "non-contiguous"]),
    "short storage": (_short_storage, ["tensor 'w.weight'", "its zip entry holds 16"]),
    "mixed formats": (
        _mixed,
        ["several formats", "torch: pytorch_model.bin", "incomplete: no model.safetensors"],
    ),
    "incomplete safetensors set beside .bin": (
        _incomplete_st_beside_bin,
        ["several formats", "names missing shards model-00002-of-00002.safetensors"],
    ),
}


@pytest.mark.parametrize("sharded", [False, True])
def test_complete_safetensors_set_beside_bin_is_read(
    tmp_path: Path, sharded: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Both sets of a Hugging Face repo: the safetensors one is read, with the same statistics
    as the safetensors folder alone; the choice is logged."""
    st = FIXTURES / "llama_fp32_crc_safetensors"
    if sharded:
        d = _sharded_st_beside_bin(tmp_path)
    else:
        d = as_bin(st, tmp_path / "model")
        shutil.copy(st / "model.safetensors", d)
    with caplog.at_level(logging.INFO, logger="npu_fp.io.source"):
        src = open_model(d)
    assert {Path(r.file).suffix for r in src.tensors.values()} == {".safetensors"}
    [msg] = [r.getMessage() for r in caplog.records if "complete safetensors set" in r.getMessage()]
    assert "ignoring the PyTorch files" in msg and "pytorch_model" in msg
    assert_same_stats(fingerprint_rows(d, tmp_path / "o1"), fingerprint_rows(st, tmp_path / "o2"))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bin_is_a_named_error(tmp_path: Path, case: str) -> None:
    build, words = BAD[case]
    d = build(tmp_path)  # type: ignore[operator]
    with pytest.raises(CheckpointError) as e:
        open_model(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "PWNED").exists() and "evil_ckpt_module" not in sys.modules


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bin_cli_exit_2_nothing_left(tmp_path: Path, case: str) -> None:
    build, words = BAD[case]
    d = build(tmp_path)  # type: ignore[operator]
    # launched from inside the model folder: a module there must still never be imported
    assert_fingerprint_cli_refuses(d, tmp_path / "out", words, cwd=d)
    assert not (tmp_path / "PWNED").exists()


def test_activations_read_the_bin_copy_unchanged(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The layer-streamed forward on a `.bin` copy gives the rows of the safetensors original."""
    st = tiny_models["dense"]
    b = as_bin(st, tmp_path / "bin", shards=2)
    shutil.copy(st / "tokenizer.json", b / "tokenizer.json")
    cfg = ActivationsConfig(batch_size=2, seq_len=12, num_batches=2, seed=1)
    ctx = DistContext(0, 0, 1, resolve_device("cpu"))
    got = run_activations(ctx, cfg, str(b), open_model(b)).rows
    want = run_activations(ctx, cfg, str(st), open_model(st)).rows
    assert got == want and len(got) > 0
