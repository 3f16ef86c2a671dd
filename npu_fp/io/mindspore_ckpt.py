"""MindSpore `.ckpt` files read without MindSpore, by byte range.

The file is concatenated protobuf `Checkpoint { repeated Value { tag = 1; TensorProto tensor = 2
{ repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3 } } }` messages
(reference/checkpoint-layouts.md, section 5). The wire format is walked here by hand, with small
`pread`s, rather than through a compiled protobuf schema: that needs no protobuf dependency, never
loads the file (protobuf parses whole messages into memory and refuses messages over 2 GB), and
gives the offset of every `tensor_content`, which is what the byte-range readers need. Tensors
MindSpore split into several Values (over 512 MiB) become one `TensorRef` whose bytes are several
extents; `Int64` scalars and `str` entries (`append_dict`) are metadata; a `crc_num` trailer is
verified by streaming the file once through zlib's CRC32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from npu_fp.io.safetensors_header import (
    DTYPE_BITS,
    MAX_TENSORS,
    CheckpointError,
    FileHeader,
    TensorRef,
    open_checkpoint,
)
from npu_fp.io.validate import InputError, pread_exact

# tensor_type strings MindSpore writes -> safetensors dtype strings
CKPT_DTYPES: dict[str, str] = {
    "Float64": "F64",
    "Float32": "F32",
    "Float16": "F16",
    "BFloat16": "BF16",
    "Int64": "I64",
    "Int32": "I32",
    "Int16": "I16",
    "Int8": "I8",
    "UInt64": "U64",
    "UInt32": "U32",
    "UInt16": "U16",
    "UInt8": "U8",
    "Bool": "BOOL",
}
CRC_TRAILER = b"crc_num"  # + CRC32 of everything before it as a 10-byte big-endian integer
CRC_TRAILER_LEN = len(CRC_TRAILER) + 10
MAX_TAG_BYTES = 64 << 10
MAX_META_BYTES = 64 << 10  # a str / scalar entry kept as metadata
_BUFFER = 1 << 16  # parse window: names, dims and types only, never tensor bytes
_CRC_CHUNK = 8 << 20


@dataclass(slots=True)
class _Entry:
    tag: str
    dtype_name: str
    dims: tuple[int, ...]
    extents: list[tuple[int, int]] = field(default_factory=list)


class _Wire:
    """Reads protobuf varints and short fields from a file through one small buffer."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self._buf, self._at = b"", 0

    def byte(self, pos: int, end: int) -> int:
        if pos >= end:
            raise CheckpointError(
                f"{self.path}: protobuf field runs past its message at byte {pos}"
            )
        if not self._at <= pos < self._at + len(self._buf):
            self._buf = os.pread(self.fd, min(_BUFFER, end - pos), pos)
            self._at = pos
            if not self._buf:
                raise CheckpointError(f"{self.path}: file ends at byte {pos}; truncated")
        return self._buf[pos - self._at]

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        for _ in range(10):
            b = self.byte(pos, end)
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7
        raise CheckpointError(f"{self.path}: malformed protobuf varint before byte {pos}")

    def length(self, pos: int, end: int, what: str) -> tuple[int, int]:
        n, pos = self.varint(pos, end)
        if pos + n > end:
            raise CheckpointError(
                f"{self.path}: {what} of {n} bytes at byte {pos} runs past the end of its "
                f"message at byte {end}; the file is truncated or corrupt"
            )
        return pos + n, pos

    def read(self, pos: int, n: int, what: str) -> bytes:
        try:
            return pread_exact(self.fd, n, pos, self.path, what)
        except InputError as e:
            raise CheckpointError(str(e)) from None


def _tensor(wire: _Wire, tag: str, pos: int, end: int) -> _Entry:
    """One TensorProto: dims and type decoded, the content's byte range recorded, not read."""
    where = f"{wire.path}: tensor {tag!r}"
    dims: list[int] = []
    dtype_name: str | None = None
    content: tuple[int, int] | None = None
    while pos < end:
        key, pos = wire.varint(pos, end)
        if key == 0x08:  # dims, unpacked (what MindSpore writes)
            d, pos = wire.varint(pos, end)
            dims.append(d)
        elif key == 0x0A:  # dims, packed
            stop, pos = wire.length(pos, end, "packed dims")
            while pos < stop:
                d, pos = wire.varint(pos, stop)
                dims.append(d)
        elif key == 0x12:
            stop, begin = wire.length(pos, end, "tensor_type")
            if stop - begin > 64:
                raise CheckpointError(f"{where}: tensor_type longer than 64 bytes; corrupt")
            dtype_name = wire.read(begin, stop - begin, "tensor_type").decode("utf-8", "replace")
            pos = stop
        elif key == 0x1A:
            stop, begin = wire.length(pos, end, f"tensor {tag!r}: tensor_content")
            content = (begin, stop)
            pos = stop
        else:
            raise CheckpointError(
                f"{where}: unexpected protobuf field key {key} in a TensorProto; the file is "
                "corrupt or not a MindSpore checkpoint"
            )
    if dtype_name is None:
        raise CheckpointError(f"{where}: TensorProto without tensor_type; corrupt")
    if any(d >= 1 << 62 for d in dims):  # a negative int64 dim is a 10-byte varint >= 2**63
        raise CheckpointError(f"{where}: dims {dims} hold a negative or huge dimension")
    return _Entry(tag, dtype_name, tuple(dims), [content or (end, end)])


def _value(wire: _Wire, pos: int, end: int) -> _Entry:
    tag: str | None = None
    entry: _Entry | None = None
    while pos < end:
        key, pos = wire.varint(pos, end)
        stop, begin = wire.length(pos, end, "Value field")
        if key == 0x0A:
            if stop - begin > MAX_TAG_BYTES:
                raise CheckpointError(f"{wire.path}: tag at byte {begin} longer than 64 KiB")
            try:
                tag = wire.read(begin, stop - begin, "tag").decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{wire.path}: tag at byte {begin} is not UTF-8") from None
        elif key == 0x12:
            if tag is None:
                raise CheckpointError(f"{wire.path}: tensor at byte {begin} precedes its tag")
            entry = _tensor(wire, tag, begin, stop)
        elif key == 0x1A:
            raise CheckpointError(
                f"{wire.path}: tensor {tag!r}: MapTensor (MapParameter) entries are not supported"
            )
        else:
            raise CheckpointError(
                f"{wire.path}: unexpected protobuf field key {key} at byte {pos}; the file is "
                "corrupt, encrypted (saved with enc_key: decrypt it with MindSpore first) or "
                "not a MindSpore checkpoint"
            )
        pos = stop
    if entry is None:
        raise CheckpointError(f"{wire.path}: Value {tag!r} holds no tensor")
    return entry


def _peek_tag(wire: _Wire, pos: int, end: int) -> str:
    """The tag a Value starts with, to name the tensor of a truncated file ('?' if unreadable)."""
    try:
        key, pos = wire.varint(pos, end)
        stop, begin = wire.length(pos, end, "tag")
        if key != 0x0A or stop - begin > MAX_TAG_BYTES:
            return "?"
        return wire.read(begin, stop - begin, "tag").decode("utf-8", "replace")
    except CheckpointError:
        return "?"


def _entries(wire: _Wire, end: int) -> list[_Entry]:
    """Top level: repeated `0x0A len Value`; consecutive Values with one tag are one tensor."""
    out: list[_Entry] = []
    seen: set[str] = set()
    pos = 0
    while pos < end:
        key, after = wire.varint(pos, end)
        if key != 0x0A:
            raise CheckpointError(
                f"{wire.path}: byte {pos} does not start a checkpoint Value (field key {key}); "
                "the file is corrupt, encrypted (saved with enc_key: decrypt it with MindSpore "
                "first) or not a MindSpore checkpoint"
            )
        n, begin = wire.varint(after, end)
        if begin + n > end:
            raise CheckpointError(
                f"{wire.path}: tensor {_peek_tag(wire, begin, end)!r}: its Value of {n} bytes "
                f"at byte {begin} runs past the end of the data at byte {end}; the file is "
                "truncated"
            )
        stop = begin + n
        e = _value(wire, begin, stop)
        last = out[-1] if out else None
        if last is not None and last.tag == e.tag:
            if (last.dtype_name, last.dims) != (e.dtype_name, e.dims):
                raise CheckpointError(
                    f"{wire.path}: tensor {e.tag!r}: a slice says {e.dtype_name} {list(e.dims)}, "
                    f"the first {last.dtype_name} {list(last.dims)}"
                )
            last.extents += e.extents
        elif e.tag in seen:
            raise CheckpointError(f"{wire.path}: duplicate tensor name {e.tag!r}")
        else:
            seen.add(e.tag)
            out.append(e)
            if len(out) > MAX_TENSORS:
                raise CheckpointError(f"{wire.path}: more than {MAX_TENSORS} tensors in one file")
        pos = stop
    return out


# files whose CRC already matched in this process, by identity (ctime changes on any write):
# compare opens every model several times, and the check reads the whole file
_CRC_VERIFIED: set[tuple[int, ...]] = set()


def _check_crc(fd: int, path: str, size: int) -> int:
    """Size of the protobuf part: the file less a verified `crc_num` trailer, if it has one."""
    if size < CRC_TRAILER_LEN:
        return size
    tail = os.pread(fd, CRC_TRAILER_LEN, size - CRC_TRAILER_LEN)
    if not tail.startswith(CRC_TRAILER):
        return size
    want = int.from_bytes(tail[len(CRC_TRAILER) :], "big")
    end = size - CRC_TRAILER_LEN
    st = os.fstat(fd)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if identity in _CRC_VERIFIED:
        return end
    crc, pos = 0, 0
    while pos < end:
        chunk = os.pread(fd, min(_CRC_CHUNK, end - pos), pos)
        if not chunk:
            raise CheckpointError(f"{path}: file ended at byte {pos} while checking its CRC")
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    if crc != want:
        raise CheckpointError(
            f"{path}: CRC32 check failed (the crc_num trailer says {want:#010x}, the content "
            f"gives {crc:#010x}); the file is damaged"
        )
    _CRC_VERIFIED.add(identity)
    return end


def _meta_value(wire: _Wire, e: _Entry) -> str:
    b, end = e.extents[0]
    raw = wire.read(b, min(end - b, MAX_META_BYTES), "metadata entry")
    if e.dtype_name == "str":  # numpy's fixed-width unicode: UTF-32
        return raw.decode("utf-32-le", "replace").rstrip("\0")
    return str(int.from_bytes(raw, "little", signed=True))


def _is_metadata(e: _Entry) -> bool:
    return e.dtype_name == "str" or (e.dims == () and e.dtype_name.startswith(("Int", "UInt")))


def read_ckpt_header(path: str | os.PathLike[str]) -> FileHeader:
    """Every tensor of one `.ckpt` file, located by byte range(s), without reading tensor data."""
    path = str(Path(path).absolute())
    fd = open_checkpoint(path, "MindSpore checkpoint")
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file; not a MindSpore checkpoint")
        wire = _Wire(fd, path)
        end = _check_crc(fd, path, size)
        entries = _entries(wire, end)
        refs: list[TensorRef] = []
        metadata: dict[str, str] = {"format": "ms"}
        for e in entries:
            if _is_metadata(e):
                metadata[e.tag] = _meta_value(wire, e)
                continue
            refs.append(_ref(path, e))
    except OSError as ex:
        raise CheckpointError(f"{path}: cannot read: {ex.strerror}") from ex
    finally:
        os.close(fd)
    # identity of the layout (names, types, shapes, offsets): what a safetensors header hashes
    layout = json.dumps(
        [[r.name, r.dtype, list(r.shape), r.begin, r.end, list(r.extra)] for r in refs]
    ).encode()
    refs.sort(key=lambda r: (r.begin, r.name))
    meta = metadata | {"layout_sha256": hashlib.sha256(layout).hexdigest()}
    return FileHeader(path, size, end, meta, tuple(refs), layout)


def _ref(path: str, e: _Entry) -> TensorRef:
    dtype = CKPT_DTYPES.get(e.dtype_name)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {e.tag!r}: unknown or unsupported tensor_type "
            f"{e.dtype_name[:40]!r}; expected one of {sorted(CKPT_DTYPES)}"
            + (" (Int4 / qint4x2 is not supported)" if e.dtype_name == "Int4" else "")
        )
    need = math.prod(e.dims) * DTYPE_BITS[dtype] // 8
    have = sum(stop - begin for begin, stop in e.extents)
    if need != have:
        raise CheckpointError(
            f"{path}: tensor {e.tag!r}: {e.dtype_name} dims {list(e.dims)} need {need} bytes "
            f"but its tensor_content holds {have}"
            + (f" over {len(e.extents)} slices" if len(e.extents) > 1 else "")
        )
    (b0, e0), *rest = e.extents
    return TensorRef(e.tag, path, dtype, e.dims, b0, e0, tuple(rest))
