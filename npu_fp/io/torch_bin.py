"""PyTorch `.bin` / `.pt` files (the zip format of `torch.save`), read by byte range.

A zip-format torch file is `<prefix>/data.pkl` (the pickled state dict) plus one uncompressed
zip entry `<prefix>/data/<key>` per storage. The pickle is walked here with an unpickler that
resolves no global at all: the few names of tensor rebuilding (`torch._utils._rebuild_tensor_v2`
and friends, the storage classes, `collections.OrderedDict`) become inert placeholders, every other
name is refused before anything is imported, so no code a file names ever runs. Each tensor then
becomes a `TensorRef` over its bytes inside the storage's zip entry, and the reader maps those
bytes like a safetensors tensor. Hand-written rather than `torch.load(..., mmap=True)`: torch
gives mapped tensors but not their file offsets, which the byte-range readers, the planner and
the content hashes need, and the placeholders never touch tensor data at open time.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
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

MAX_PICKLE_BYTES = 256 << 20  # a state dict's pickle holds names and shapes only
MAX_NESTING = 64  # dicts inside dicts ({"model": {"state_dict": ...}}), as for JSON
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled magic number

# typed storage classes (torch.FloatStorage, ...) and torch dtypes -> safetensors dtype strings
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
TORCH_DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


def _itemsize(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str | None  # None for UntypedStorage (the tensor gives the dtype)
    numel: int  # in elements of `dtype`, bytes when untyped


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    dtype: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_REBUILD_TENSOR = {"_rebuild_tensor_v2", "_rebuild_tensor_v3"}
_REBUILD_PARAMETER = {"_rebuild_parameter", "_rebuild_parameter_with_state"}
_ALLOWED = (
    "torch._utils._rebuild_tensor_v2/_v3 and _rebuild_parameter, torch.<T>Storage, "
    "torch.storage.UntypedStorage, torch dtypes, collections.OrderedDict"
)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62)


@dataclass(frozen=True, slots=True)
class _Global:
    """A name the pickle asked for: a placeholder, never the imported object.

    Calling it (the pickle's REDUCE) builds an inert `_Tensor` record for the rebuild functions
    and refuses anything else (storage classes and dtypes are only ever arguments).
    """

    path: str
    module: str
    name: str

    def __call__(self, *args: object) -> _Tensor:
        if self.name in _REBUILD_PARAMETER:
            if not args or not isinstance(args[0], _Tensor):
                raise CheckpointError(f"{self.path}: {self.name} without a tensor in the pickle")
            return args[0]
        if self.name not in _REBUILD_TENSOR:
            raise CheckpointError(
                f"{self.path}: the pickle calls {self.module}.{self.name}; only tensor "
                "rebuilding is allowed"
            )
        storage, offset, shape, stride = (*args, None, None, None, None)[:4]
        if self.name == "_rebuild_tensor_v3":
            dt = args[6] if len(args) > 6 else None
            dtype = TORCH_DTYPE_NAMES.get(dt.name) if isinstance(dt, _Global) else None
        else:
            dtype = storage.dtype if isinstance(storage, _Storage) else None
        if not (
            isinstance(storage, _Storage)
            and dtype is not None
            and _count(offset)
            and isinstance(shape, tuple)
            and isinstance(stride, tuple)
            and len(shape) == len(stride)
            and all(_count(d) for d in shape + stride)
        ):
            raise CheckpointError(
                f"{self.path}: {self.name} arguments are not (storage, offset, shape, stride"
                "[, ..., dtype]) of a tensor"
            )
        return _Tensor(storage, dtype, offset, shape, stride)


class _Unpickler(pickle.Unpickler):
    """Unpickles a state dict into placeholders; refuses every other global without importing it."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        allowed = (
            (module == "torch._utils" and name in _REBUILD_TENSOR | _REBUILD_PARAMETER)
            or (module == "torch" and (name in STORAGE_DTYPES or name in TORCH_DTYPE_NAMES))
            or (module == "torch.storage" and name == "UntypedStorage")
        )
        if allowed:
            return _Global(self.path, module, name)
        raise CheckpointError(
            f"{self.path}: the pickle names the global {module[:100]}.{name[:100]}; only tensor "
            f"rebuilding is allowed ({_ALLOWED}), so the file is refused and nothing it names "
            "was imported or run"
        )

    def persistent_load(self, pid: object) -> _Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _Global)
            or not isinstance(pid[2], str)
            or not _count(pid[4])
        ):
            raise CheckpointError(
                f"{self.path}: unexpected persistent id in the pickle; expected ('storage', "
                "<storage class>, key, location, numel)"
            )
        kind = pid[1].name
        if kind == "UntypedStorage":
            return _Storage(pid[2], None, pid[4])
        if kind not in STORAGE_DTYPES:
            raise CheckpointError(f"{self.path}: {kind!r} is not a tensor storage class")
        return _Storage(pid[2], STORAGE_DTYPES[kind], pid[4])


def _load_pickle(data: bytes, path: str) -> object:
    try:
        return _Unpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # any malformed pickle: truncated, bad opcode, wrong stack, recursion
        raise CheckpointError(
            f"{path}: the pickle in data.pkl is corrupt or not a state dict "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _flatten(
    path: str, obj: object, prefix: str, out: dict[str, _Tensor], skipped: list[str], depth: int = 0
) -> None:
    """Tensors of a (possibly nested) dict by dotted name; other leaves are not weights."""
    if depth > MAX_NESTING:
        raise CheckpointError(f"{path}: dicts nested deeper than {MAX_NESTING} levels")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: state dict key {str(k)[:80]!r} is not a string")
            _flatten(path, v, f"{prefix}{k}.", out, skipped, depth + 1)
    elif isinstance(obj, _Tensor):
        out[prefix[:-1]] = obj
    else:
        skipped.append(prefix[:-1])


def _contiguous(t: _Tensor) -> bool:
    expect = 1
    for d, s in zip(reversed(t.shape), reversed(t.stride), strict=True):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _entry_data_start(fd: int, path: str, info: zipfile.ZipInfo, size: int) -> int:
    """Absolute offset of an uncompressed entry's bytes (after its local header)."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise CheckpointError(
            f"{path}: zip entry {info.filename!r} is compressed; torch.save stores tensor data "
            "uncompressed (re-save it with torch.save)"
        )
    raw = pread_exact(fd, _ZIP_LOCAL_HEADER.size, info.header_offset, path, "zip local header")
    sig, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(raw)
    if sig != b"PK\x03\x04":
        raise CheckpointError(
            f"{path}: zip entry {info.filename!r}: bad local header; corrupt file"
        )
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > size:
        raise CheckpointError(
            f"{path}: zip entry {info.filename!r} runs past the end of the file ({size} bytes); "
            "the file is truncated"
        )
    return start


def read_torch_header(path: str | os.PathLike[str]) -> FileHeader:
    """Every tensor of one zip-format torch file, located by byte range, with no data read."""
    path = str(Path(path).absolute())
    fd = open_checkpoint(path, "torch file")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(_LEGACY_MAGIC), 0)
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format, which cannot be read "
                "without running its pickle; convert it: torch.save(torch.load(f, "
                "weights_only=True), f) or save it as safetensors"
            )
        try:
            with os.fdopen(os.dup(fd), "rb") as fh, zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
        # zipfile raises NotImplementedError for a zip version or feature it does not know: a
        # mutated header, not a torch file we could read
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            EOFError,
            ValueError,
            NotImplementedError,
        ) as e:
            raise CheckpointError(
                f"{path}: not a zip-format torch file (truncated or corrupt: {e})"
            ) from None
        pkls = [i for i in infos if i.filename.rpartition("/")[2] == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(
                f"{path}: expected one data.pkl entry in the zip, found {len(pkls)}; not a "
                "torch.save file"
            )
        prefix = pkls[0].filename.removesuffix("data.pkl")
        by_name = {i.filename: i for i in infos}
        order = by_name.get(prefix + "byteorder")
        if order is not None and order.file_size < 16:
            start = _entry_data_start(fd, path, order, size)
            if pread_exact(fd, order.file_size, start, path, "byteorder") != b"little":
                raise CheckpointError(f"{path}: big-endian torch file; only little-endian is read")
        if pkls[0].file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{path}: data.pkl is {pkls[0].file_size} bytes; at most {MAX_PICKLE_BYTES} "
                "expected for a state dict"
            )
        pkl_start = _entry_data_start(fd, path, pkls[0], size)
        pkl = pread_exact(fd, pkls[0].file_size, pkl_start, path, "data.pkl")
        tensors: dict[str, _Tensor] = {}
        skipped: list[str] = []
        _flatten(path, _load_pickle(pkl, path), "", tensors, skipped)
        if len(tensors) > MAX_TENSORS:
            raise CheckpointError(f"{path}: more than {MAX_TENSORS} tensors in one file")
        refs = []
        for name, t in tensors.items():
            info = by_name.get(f"{prefix}data/{t.storage.key}")
            if info is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r}: storage {t.storage.key!r} has no zip entry "
                    f"{prefix}data/{t.storage.key}"
                )
            refs.append(_locate(fd, path, size, name, t, info))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from e
    except InputError as e:
        raise CheckpointError(str(e)) from None
    finally:
        os.close(fd)
    refs.sort(key=lambda r: (r.begin, r.name))
    meta = {"format": "pt"} | ({"skipped": ", ".join(skipped[:50])} if skipped else {})
    return FileHeader(path, size, len(pkl), meta, tuple(refs), pkl)


def _locate(
    fd: int, path: str, size: int, name: str, t: _Tensor, info: zipfile.ZipInfo
) -> TensorRef:
    item = _itemsize(t.dtype)
    storage_bytes = t.storage.numel * (item if t.storage.dtype is not None else 1)
    if storage_bytes != info.file_size:
        raise CheckpointError(
            f"{path}: tensor {name!r}: storage {t.storage.key!r} claims {storage_bytes} bytes "
            f"but its zip entry holds {info.file_size}"
        )
    if not _contiguous(t):
        raise CheckpointError(
            f"{path}: tensor {name!r}: a non-contiguous view (shape {list(t.shape)}, stride "
            f"{list(t.stride)}); save tensor.contiguous() (or safetensors) instead"
        )
    nbytes = math.prod(t.shape) * item
    begin = t.offset * item
    if begin + nbytes > info.file_size:
        raise CheckpointError(
            f"{path}: tensor {name!r}: offset {t.offset} and shape {list(t.shape)} need "
            f"{begin + nbytes} bytes of storage {t.storage.key!r}, which holds {info.file_size}"
        )
    start = _entry_data_start(fd, path, info, size) + begin
    return TensorRef(name, path, t.dtype, t.shape, start, start + nbytes)
