"""Content stamps: a cheap proof that a model folder still holds the bytes a signature describes.

A stamp per weight file is its size, its mtime_ns and the sha256 of a few fixed byte windows
(spread evenly from the first to the last byte; a small file is hashed whole). Headers alone do
not bind a signature to content: two same-shape models have identical headers. Hashing every
byte would cost a full pass, which is what fingerprinting is; the windows catch any replacement
of the weights by other weights (every window changes) at 512 KiB of reads per file. They do not
catch an edit confined to bytes between the windows with the mtime set back: that needs the full
content hash a re-fingerprint computes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from npu_fp.io.source import FileInfo, weight_path
from npu_fp.io.validate import InputError, open_regular, os_error, pread_exact

WINDOW_BYTES = 64 << 10
NUM_WINDOWS = 8
STAMP_KEYS = ("size", "mtime_ns", "sample_sha256")


class StaleSignatureError(InputError):
    """The weights in a model folder are not the bytes its signature was computed from."""


@dataclass(frozen=True, slots=True)
class FileStamp:
    size: int
    mtime_ns: int
    sample_sha256: str

    def as_dict(self) -> dict[str, int | str]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sample_sha256": self.sample_sha256}


def windows(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled windows: fixed by the size alone, so stamps compare."""
    if size <= WINDOW_BYTES * NUM_WINDOWS:
        return [(0, size)]
    last = size - WINDOW_BYTES
    return [(last * k // (NUM_WINDOWS - 1), WINDOW_BYTES) for k in range(NUM_WINDOWS)]


def file_stamp(path: str | os.PathLike[str]) -> FileStamp:
    fd = open_regular(path, "weight file")
    try:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise os_error(path, "stat weight file", e) from e
        h = hashlib.sha256()
        for offset, length in windows(st.st_size):
            h.update(pread_exact(fd, length, offset, path, "weight file"))
        return FileStamp(st.st_size, st.st_mtime_ns, h.hexdigest())
    finally:
        os.close(fd)


def folder_stamps(root: str | os.PathLike[str], names: list[str]) -> dict[str, FileStamp]:
    """Stamps of the weight files `names` (relative to the model folder `root`)."""
    return {n: file_stamp(weight_path(root, n)) for n in names}


def stamped_files(files: Iterable[FileInfo], stamps: dict[str, FileStamp]) -> list[dict]:
    """`identity.files` of a signature: each file's header digest and content stamp."""
    return [
        {"name": f.name, "header_sha256": f.header_sha256, **stamps[f.name].as_dict()}
        for f in files
    ]


def stamp_mismatch(recorded: list[dict], root: str | os.PathLike[str]) -> str | None:
    """Why the files of a model folder differ from the `identity.files` a signature recorded
    (naming the first file that changed), or None when every stamp matches."""
    for f in recorded:
        name = f["name"]
        if any(k not in f for k in STAMP_KEYS):
            return f"{name}: the signature records no content stamp (made by an older npu_fp)"
        try:
            now = file_stamp(weight_path(root, name))
        except InputError as e:
            return str(e)
        for key, what in (
            ("size", "size"),
            ("sample_sha256", "sampled bytes"),
            ("mtime_ns", "modification time"),
        ):
            if now.as_dict()[key] != f[key]:
                return (
                    f"{weight_path(root, name)}: {what} changed since it was fingerprinted "
                    f"({f[key]} then, {now.as_dict()[key]} now)"
                )
    return None
