"""Checkpoint sources and every malformed input: a named error, file and tensor in the message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from npu_fp.io.reader import FileCache, RowReader
from npu_fp.io.safetensors_header import CheckpointError, read_header
from npu_fp.io.source import open_model

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 1}


def raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    h = json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path


def model_dir(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file(
        tensors or {"a": torch.arange(12.0).view(3, 4), "b": torch.ones(5)},
        str(d / "model.safetensors"),
    )
    return d


def test_single_file_offsets_and_read(tmp_path: Path) -> None:
    a = torch.arange(24, dtype=torch.float32).view(6, 4)
    src = open_model(model_dir(tmp_path, {"a": a, "c": torch.zeros(2, dtype=torch.bfloat16)}))
    ref = src.tensors["a"]
    assert ref.shape == (6, 4) and ref.dtype == "F32" and ref.nbytes == 96
    with FileCache() as files:
        r = RowReader(files)
        assert torch.equal(r.read(ref, 2, 5), a[2:5])


def test_sharded_with_index(tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file({"x": torch.ones(3)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(4)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 999},  # generators disagree on this: never validated
                "weight_map": {
                    "x": "model-00001-of-00002.safetensors",
                    "y": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    src = open_model(d)
    assert list(src.tensors) == ["x", "y"] and len(src.files) == 2


def test_hf_cache_folder(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(blobs / "deadbeef"))
    (blobs / "cfg").write_text(json.dumps(CONFIG))
    (snap / "model.safetensors").symlink_to(blobs / "deadbeef")
    (snap / "config.json").symlink_to(blobs / "cfg")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    src = open_model(tmp_path / "models--org--tiny")
    assert src.root.endswith("abc123") and "w" in src.tensors


def test_fp8_block_dequantization(tmp_path: Path) -> None:
    w = torch.randn(200, 130)
    q = w.to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2) + 0.5
    d = model_dir(tmp_path, {"l.weight": q, "l.weight_scale_inv": scale})
    src = open_model(d)
    with FileCache() as files:
        r = RowReader(files)
        x = r.widen(
            src.tensors["l.weight"],
            r.read(src.tensors["l.weight"], 100, 200),
            100,
            src.tensors["l.weight_scale_inv"],
        )
    ref_full = (
        q.to(torch.float32)
        * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    )
    assert torch.equal(x, ref_full[100:200])


# --- malformed inputs -------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*truncated"):
        open_model(d)


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_header(p)


def test_header_length_past_end(tmp_path: Path) -> None:
    p = raw_safetensors(tmp_path / "x.safetensors", {}, b"", header_len=10_000)
    with pytest.raises(CheckpointError, match="runs past the end"):
        read_header(p)


def test_invalid_header_json(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        read_header(p)


def test_overlapping_offsets(tmp_path: Path) -> None:
    hdr = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    p = raw_safetensors(tmp_path / "x.safetensors", hdr, bytes(12))
    with pytest.raises(CheckpointError, match="'b'.*overlaps"):
        read_header(p)


def test_out_of_range_offsets(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    p = raw_safetensors(tmp_path / "x.safetensors", hdr, bytes(8))
    with pytest.raises(CheckpointError, match="'a'.*out of range"):
        read_header(p)


def test_shape_dtype_disagree_with_byte_length(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "BF16", "shape": [3, 3], "data_offsets": [0, 16]}}
    p = raw_safetensors(tmp_path / "x.safetensors", hdr, bytes(16))
    with pytest.raises(CheckpointError, match=r"'a'.*BF16 shape \[3, 3\] needs 18 bytes"):
        read_header(p)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        open_model(d)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd"])
def test_index_path_outside_model_folder(tmp_path: Path, bad: str) -> None:
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": bad}}))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_model(d)


def test_duplicate_tensor_names_across_shards(tmp_path: Path) -> None:
    d = tmp_path / "dup"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file({"x": torch.ones(3)}, str(d / "a.safetensors"))
    save_file({"x": torch.ones(3)}, str(d / "b.safetensors"))
    with pytest.raises(CheckpointError, match="duplicate tensor name 'x'"):
        open_model(d)


def test_duplicate_keys_inside_one_header(tmp_path: Path) -> None:
    raw = (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="duplicate tensor name 'a'"):
        read_header(p)


def test_missing_config(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        open_model(d)


def test_invalid_config(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        open_model(d)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_model(tmp_path / "nope")


def test_invalid_index_json(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json: invalid index"):
        open_model(d)


def test_index_lists_tensor_not_in_its_shard(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "ghost": "model.safetensors"}})
    )
    with pytest.raises(
        CheckpointError, match="tensor 'ghost' is listed in model.safetensors but not"
    ):
        open_model(d)


def test_index_names_the_wrong_shard(tmp_path: Path) -> None:
    d = tmp_path / "two"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file({"x": torch.ones(3)}, str(d / "a.safetensors"))
    save_file({"y": torch.ones(3)}, str(d / "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "b.safetensors", "y": "a.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="'x' is listed in b.safetensors but stored in a"):
        open_model(d)


def test_unknown_dtype(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}
    p = raw_safetensors(tmp_path / "x.safetensors", hdr, bytes(2))
    with pytest.raises(CheckpointError, match="'a': unknown dtype 'F12'"):
        read_header(p)


def test_folder_without_safetensors(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_model(d)


def test_hf_cache_with_ambiguous_snapshots(tmp_path: Path) -> None:
    for rev in ("r1", "r2"):
        (tmp_path / "models--o--m" / "snapshots" / rev).mkdir(parents=True)
    with pytest.raises(CheckpointError, match="2 snapshots and no refs/main"):
        open_model(tmp_path / "models--o--m")


def test_model_path_is_not_a_checkpoint_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a model folder or a .safetensors file"):
        open_model(f)
