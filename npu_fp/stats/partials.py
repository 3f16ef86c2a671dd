"""Resumable partial results: each finished work item's table rows, kept under the run directory.

A rank appends one record per finished work item (segment moments of the whole and its parts,
with the segment's content digest) to its own file under `OUT/.partials/<key>/`. The key is a
sha256 of everything that shapes the numbers: the model's content stamps and header digests,
config.json, the plan's items and table slots, the chunk and read sizes, the device type and the
npu_fp version, so a partial is reused only by a run that would have computed the same bits.
Each record carries an xxh3-128 over the key, the item and its payload: a record torn by a kill
(or any edited byte) fails the check and is recomputed. Rows are stored as raw float64, so a
resumed run merges exactly the numbers an undisturbed run would and writes the same signature.

The format is hand-written (fixed-size records in an append-only file) because a record must be
durable the moment its item is done and a torn tail must cost one item, not the file; neither
numpy's .npy nor safetensors can be appended to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
import xxhash

from npu_fp.stats.moments import NUM_FIELDS

PARTIALS_NAME = ".partials"
_MAGIC = b"NPFP"
_HEAD = struct.Struct("<4sII16s")  # magic, work item index, rows, xxh3-128(key, item, payload)
_ROW_BYTES = NUM_FIELDS * 8


def inputs_key(inputs: dict) -> str:
    """The digest that seals partials to the run that made them (canonical JSON, sha256)."""
    return hashlib.sha256(
        json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _digest(key: str, item: int, payload: bytes) -> bytes:
    return xxhash.xxh3_128(key.encode() + struct.pack("<I", item) + payload).digest()


class PartialStore:
    """This rank's append-only record file, plus every valid record any earlier run left."""

    def __init__(self, out_dir: Path, key: str, rank: int) -> None:
        self.key = key
        self.dir = out_dir / PARTIALS_NAME / key
        self.dir.mkdir(parents=True, exist_ok=True)
        # a file of its own per process: an earlier file may end in a torn record
        self._path = self.dir / f"rank{rank}-{uuid.uuid4().hex[:12]}.bin"
        self._file = open(self._path, "ab")  # noqa: SIM115 (closed by close())

    def load(self) -> dict[int, torch.Tensor]:
        """Rows of every work item a valid record holds (any rank's, any earlier run's)."""
        found: dict[int, torch.Tensor] = {}
        for p in sorted(self.dir.glob("rank*.bin")):
            if p != self._path:
                found.update(self._read(p))
        return found

    def _read(self, path: Path) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        with contextlib.suppress(OSError), open(path, "rb") as f:
            while head := f.read(_HEAD.size):
                if len(head) < _HEAD.size:
                    break
                magic, item, rows, digest = _HEAD.unpack(head)
                if magic != _MAGIC or rows > 1 << 16:
                    break
                payload = f.read(rows * _ROW_BYTES)
                if len(payload) < rows * _ROW_BYTES or _digest(self.key, item, payload) != digest:
                    break  # torn or damaged: this and what follows are recomputed
                out[item] = torch.frombuffer(bytearray(payload), dtype=torch.float64).view(
                    rows, NUM_FIELDS
                )
        return out

    def save(self, item: int, rows: torch.Tensor) -> None:
        """Append one item's rows; durable (fsync) before the next item starts."""
        payload = rows.to(torch.float64).contiguous().numpy().tobytes()
        head = _HEAD.pack(_MAGIC, item, rows.shape[0], _digest(self.key, item, payload))
        self._file.write(head + payload)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._path.exists() and self._path.stat().st_size == 0:
            self._path.unlink()


def drop_other_runs(out_dir: Path, key: str) -> None:
    """Partials sealed to other inputs (another model, plan or setting) can never be reused."""
    root = out_dir / PARTIALS_NAME
    if root.is_dir():
        for d in root.iterdir():
            if d.name != key:
                shutil.rmtree(d, ignore_errors=True)


def drop_all(out_dir: Path) -> None:
    """After the output set is committed the partials have served their purpose."""
    shutil.rmtree(out_dir / PARTIALS_NAME, ignore_errors=True)
