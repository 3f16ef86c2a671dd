"""safetensors headers, parsed and validated without reading tensor data.

The format (reference/checkpoint-layouts.md, section 4): 8-byte little-endian header length N, N bytes
of JSON, then the data region. Offsets are relative to byte 8+N, cover the region without holes or
overlaps, and `end - begin` equals the element count times the dtype width. Every violation raises
`CheckpointError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000

# bits per element for every dtype string safetensors defines
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


class CheckpointError(ValueError):
    """A checkpoint file or folder is not what it claims to be. The message names file and tensor."""


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor's location: no data, just where its bytes are."""

    name: str
    file: str  # absolute path of the file holding it
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first byte in `file`
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Leading dimension of the [rows, cols] view used for splitting (1-D: one row per element)."""
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


@dataclass(frozen=True, slots=True)
class FileHeader:
    path: str
    size: int
    header_len: int
    metadata: dict[str, str]
    tensors: tuple[TensorRef, ...]  # in data-offset order
    header_bytes: bytes  # raw JSON, for identity hashing


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """Parse and validate one safetensors file's header."""
    path = str(Path(path).absolute())
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; at least 8 expected for "
                    "the header length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; "
                    "not a safetensors file or corrupted"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from e
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: duplicate tensor name {e.args[0]!r} in the header") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header JSON must be an object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    data_start = 8 + n
    data_len = size - data_start
    refs = []
    for name, entry in header.items():
        refs.append(_parse_entry(path, name, entry, data_start, data_len))
    refs.sort(key=lambda r: (r.begin, r.end))
    cursor = data_start
    for r in refs:
        if r.begin < cursor:
            raise CheckpointError(
                f"{path}: tensor {r.name!r} at data offsets "
                f"[{r.begin - data_start}, {r.end - data_start}) overlaps the previous tensor"
            )
        if r.begin > cursor and r.nbytes > 0:
            raise CheckpointError(
                f"{path}: tensor {r.name!r} leaves a hole before data offset {r.begin - data_start}"
            )
        cursor = max(cursor, r.end)
    if cursor != size:
        raise CheckpointError(
            f"{path}: tensors cover {cursor - data_start} data bytes but the file holds {data_len}; "
            "the file is truncated or has trailing bytes"
        )
    return FileHeader(path, size, n, {str(k): str(v) for k, v in metadata.items()}, tuple(refs), raw)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_entry(path: str, name: str, entry: object, data_start: int, data_len: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointError(
            f"{path}: tensor {name!r}: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BITS)}"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape must be a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
    ):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    if 0 <= begin <= end and end > data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) out of range: the data "
            f"region holds only {data_len} bytes (file truncated?)"
        )
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) out of range; the data region "
            f"holds {data_len} bytes"
        )
    expected = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r}: {dtype} shape {shape} needs {expected} bytes but "
            f"data_offsets span {end - begin}"
        )
    return TensorRef(name, path, dtype, tuple(shape), data_start + begin, data_start + end)
