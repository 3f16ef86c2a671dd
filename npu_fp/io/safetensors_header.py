"""safetensors headers, parsed and validated without reading tensor data.

The format (reference/checkpoint-layouts.md, section 4): 8-byte little-endian header length N, N bytes
of JSON, then the data region. Offsets are relative to byte 8+N, cover the region without holes or
overlaps, and `end - begin` equals the element count times the dtype width. Every violation raises
`CheckpointError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from npu_fp.io.validate import InputError, loads_json, open_regular, os_error, pread_exact

if TYPE_CHECKING:
    from npu_fp.io.gguf_codec import RowCodec

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
# The largest released checkpoints hold ~150k tensors (384-expert MoE with FP8 scales); every later
# stage does per-tensor work, so a header claiming far more is refused before that work starts.
MAX_TENSORS = 500_000
# safetensors stores usize; torch indexes with int64, so a larger dimension or offset is unusable
MAX_INT = (1 << 63) - 1

# bits per element for every dtype string safetensors defines
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class CheckpointError(InputError):
    """A checkpoint file or folder is not what it claims to be. The message names file and tensor."""


def open_checkpoint(path: str, what: str) -> int:
    """`validate.open_regular` (no FIFO or device, no blocking) with its error as a CheckpointError,
    the one error type of every weight-file reader."""
    try:
        return open_regular(path, what)
    except InputError as e:
        raise CheckpointError(str(e)) from None


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor's location: no data, just where its bytes are."""

    name: str
    file: str  # absolute path of the file holding it
    dtype: str  # safetensors dtype string, or a GGUF tensor's ggml type name ("Q4_K")
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first byte in `file`
    end: int  # absolute, exclusive
    # further [begin, end) byte extents that continue the tensor in order, for formats that store
    # one tensor in several pieces (MindSpore splits tensors over 512 MiB); empty for safetensors
    extra: tuple[tuple[int, int], ...] = ()
    # rows decoded on read (GGUF: dequantized, converter edits undone); None: stored values
    codec: RowCodec | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.begin + sum(e - b for b, e in self.extra)

    def pieces(self, offset: int, n: int) -> list[tuple[int, int]]:
        """Absolute (file offset, length) pieces holding tensor bytes [offset, offset + n)."""
        out = []
        for b, e in ((self.begin, self.end), *self.extra):
            if n <= 0:
                break
            if offset < e - b:
                take = min(n, e - b - offset)
                out.append((b + offset, take))
                n -= take
                offset = 0
            else:
                offset -= e - b
        return out

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
    """Parse and validate one safetensors file's header with the reference implementation's rules.

    Offsets and shapes are unsigned integers (booleans and floats refused), `__metadata__` maps
    strings to strings, the header starts with `{`, tensors tile the data region in offset order
    with no hole, overlap or trailing byte, and each byte length equals its element count times
    the dtype width (sub-byte counts must fill whole bytes). Work is linear in the header size.
    """
    path = str(Path(path).absolute())
    fd = open_checkpoint(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes; at least 8 expected for "
                "the header length)"
            )
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            # the length itself is never printed: it is the file's first 8 bytes
            raise CheckpointError(
                f"{path}: the header length (first 8 bytes) exceeds the {MAX_HEADER_BYTES}-byte "
                "limit; not a safetensors file or corrupted"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: the header length (first 8 bytes) runs past the end of the file "
                f"({size} bytes); the file is truncated or not safetensors"
            )
        raw = pread_exact(fd, n, 8, path, "safetensors header")
    except OSError as e:
        raise CheckpointError(str(os_error(path, "read", e))) from e
    except InputError as e:
        raise CheckpointError(str(e)) from None
    finally:
        os.close(fd)
    # fast refusal before the parse (every entry spells this key; an escaped spelling only
    # defers the refusal to the count after parsing)
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise CheckpointError(
            f"{path}: more than {MAX_TENSORS} tensors in one file; at most that many expected"
        )
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: header does not start with '{{'; not a safetensors file")
    try:
        # no depth walk: _parse_entry checks every field it reads, and a header holds 1M entries
        header = loads_json(raw, f"{path}: header", max_depth=None)
    except InputError as e:
        detail = (
            str(e)
            .removeprefix(f"{path}: header: ")
            .replace("duplicate key", "duplicate tensor name")
        )
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {detail}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header JSON must be an object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object mapping strings to strings")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(
            f"{path}: {len(header)} tensors in one file; at most {MAX_TENSORS} expected"
        )
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
        if r.begin > cursor:
            raise CheckpointError(
                f"{path}: tensor {r.name!r} leaves a hole before data offset {r.begin - data_start}"
            )
        cursor = r.end
    if cursor != size:
        raise CheckpointError(
            f"{path}: tensors cover {cursor - data_start} data bytes but the file holds {data_len}; "
            "the file is truncated or has trailing bytes"
        )
    return FileHeader(path, size, n, dict(metadata), tuple(refs), raw)


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT


def _parse_entry(path: str, name: str, entry: object, data_start: int, data_len: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(
            f"{path}: tensor {name!r}: unknown dtype {str(dtype)[:40]!r}; expected one of "
            f"{sorted(DTYPE_BITS)}"
        )
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise CheckpointError(
            f"{path}: tensor {name!r}: shape must be a list of unsigned integers below 2**63"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets must be [begin, end], unsigned integers"
        )
    begin, end = offsets
    if not begin <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) out of range; the data region "
            f"holds {data_len} bytes (file truncated?)"
        )
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_INT:  # the reference uses checked multiplication: overflow is an error
            raise CheckpointError(
                f"{path}: tensor {name!r}: shape {shape} overflows the element count"
            )
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise CheckpointError(
            f"{path}: tensor {name!r}: {dtype} shape {shape} is {bits} bits, not whole bytes"
        )
    if end - begin != bits // 8:
        raise CheckpointError(
            f"{path}: tensor {name!r}: {dtype} shape {shape} needs {bits // 8} bytes but "
            f"data_offsets span {end - begin}"
        )
    return TensorRef(name, path, dtype, tuple(shape), data_start + begin, data_start + end)
