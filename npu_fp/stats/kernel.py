"""Per work item: stream bytes -> device -> mergeable moments, for the whole tensor and its parts.

The kernel widens fixed-size chunks into a reused float64 device buffer and takes sum, min/max and
the centred powers there (one pass per chunk into a reused buffer: faster than `torch.std` on the
CPU, errors below 1e-13). All chunk results of a block leave the device in one transfer. Chunk and
block grids depend only on the config and the tensor, so a segment gives the same bits on any rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import xxhash

from npu_fp.arch.base import PartSpec, TensorRole
from npu_fp.device import Device, to_device_float
from npu_fp.io.reader import RowReader, block_row_bytes, row_blocks
from npu_fp.io.safetensors_header import TensorRef
from npu_fp.plan import WorkItem
from npu_fp.stats.moments import Moments

# Below this |mean| / std a chunk's raw power sums convert to central moments with a relative error
# of about eps * ratio^4 (< 1e-13); above it the chunk is centred first. Weights sit far below it.
RAW_SAFE_RATIO = 4.0


@contextmanager
def kernel_threads(device: Device) -> Iterator[None]:
    """One intra-op thread while the kernel runs on the CPU, the caller's count restored after.

    Chunks are cache-sized; intra-op threads only add synchronisation (measured 100x slower with
    2 OpenMP threads on 256K-element ops), and ranks are the CPU parallelism. The scope matters:
    a process-wide setting made compare's matmuls after an in-process fingerprint run on one
    thread (1.7x slower pairwise phase)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MomentKernel:
    def __init__(self, device: Device, chunk_elems: int = 1 << 18) -> None:
        self.device = device
        self.chunk = chunk_elems
        self._a = torch.empty(chunk_elems, dtype=torch.float64, device=device.torch)
        self._b = torch.empty_like(self._a)

    def moments(self, x: torch.Tensor) -> Moments:
        """Moments of every element of host tensor `x` (any shape), chunk by chunk, in order."""
        flat = x.reshape(-1)
        total = Moments()
        if flat.numel() == 0:
            return total
        dev = to_device_float(flat, self.device)
        pieces = dev.split(self.chunk)
        # the first chunk tells whether this tensor has a large mean: then centre every chunk
        first = self._chunk(pieces[0], centre=False).tolist()
        centre = not (math.isfinite(first[0]) and self._raw_ok(first, pieces[0].numel()))
        rows = [] if centre else [first]
        todo = pieces if centre else pieces[1:]
        if todo:
            rows += torch.stack([self._chunk(p, centre) for p in todo]).tolist()
        for piece, row in zip(pieces, rows, strict=True):
            k = float(piece.numel())
            if not (math.isfinite(row[0]) and math.isfinite(row[5])):
                total.merge(self._nonfinite_chunk(piece))
            elif centre:
                total.merge(self._from_centred(row, k))
            elif self._raw_ok(row, k):
                total.merge(self._from_raw(row, k))
            else:  # large mean (or constant chunk): centre first, as raw sums would cancel
                total.merge(self._from_centred(self._chunk(piece, centre=True).tolist(), k))
        return total

    @staticmethod
    def _raw_ok(row: list[float], k: float) -> bool:
        s1, s2 = row[0], row[3]
        m2 = s2 - s1 * s1 / k
        return m2 > 0.0 and s1 * s1 / k <= RAW_SAFE_RATIO**2 * m2

    @staticmethod
    def _from_raw(row: list[float], k: float) -> Moments:
        s1, mn, mx, s2, s3, s4 = row
        mu = s1 / k
        m2 = s2 - s1 * mu
        m3 = s3 - 3.0 * mu * s2 + 2.0 * k * mu**3
        m4 = s4 - 4.0 * mu * s3 + 6.0 * mu * mu * s2 - 3.0 * k * mu**4
        return Moments(k, mu, m2, m3, m4, mn, mx)

    @staticmethod
    def _from_centred(row: list[float], k: float) -> Moments:
        s1, mn, mx, m2, m3, m4 = row
        return Moments(k, s1 / k, m2, m3, m4, mn, mx)

    def _chunk(self, piece: torch.Tensor, centre: bool) -> torch.Tensor:
        """[sum x, min, max, sum d^2, sum d^3, sum d^4] in float64, where d = x - chunk mean when
        `centre`, else d = x (raw power sums: one pass fewer)."""
        k = piece.numel()
        a = self._a[:k]
        a.copy_(piece)
        s = a.sum()
        # min/max on the narrow source: half the bytes of the float64 copy, and exact
        mn, mx = torch.aminmax(piece)
        if centre:
            a.sub_(s / k)
        b = self._b[:k]
        torch.mul(a, a, out=b)
        m = torch.stack([mn, mx]).to(torch.float64)
        return torch.stack([s, m[0], m[1], b.sum(), torch.dot(b, a), torch.dot(b, b)])

    def _nonfinite_chunk(self, piece: torch.Tensor) -> Moments:
        """Slow path for a chunk holding NaN or Inf: count them, take moments of the rest."""
        a = piece.to(torch.float64)
        nan = int(torch.isnan(a).sum())
        finite = torch.isfinite(a)
        inf = int(a.numel() - nan - int(finite.sum()))
        a = a[finite]
        m = Moments(nan=float(nan), inf=float(inf))
        if a.numel():
            m.merge(self._from_centred(self._chunk(a, centre=True).tolist(), float(a.numel())))
        return m


@dataclass(frozen=True, slots=True)
class ItemResult:
    whole: Moments
    parts: list[Moments]  # aligned with role.parts
    digest: bytes  # xxh3-128 of the segment's stored bytes


def part_slices(
    spec: PartSpec, x: torch.Tensor, row_begin: int, row_end: int
) -> list[torch.Tensor]:
    """Pieces of block `x` (stored rows [row_begin, row_end)) that belong to part `spec`."""
    out = []
    for start, stop in spec.ranges:
        if spec.dim == 0:
            lo, hi = max(start, row_begin), min(stop, row_end)
            if lo < hi:
                out.append(x[lo - row_begin : hi - row_begin])
        else:
            out.append(x[:, start:stop])
    return out


def item_stats(
    reader: RowReader,
    kernel: MomentKernel,
    ref: TensorRef,
    role: TensorRole | None,
    item: WorkItem,
    read_bytes: int,
    scale: TensorRef | None = None,
) -> ItemResult:
    """Moments of one segment of a tensor (and of each fused part inside it) plus its digest."""
    parts = role.parts if role is not None else ()
    block_rows = max(1, read_bytes // max(block_row_bytes(ref), 1))
    whole = Moments()
    part_m = [Moments() for _ in parts]
    hasher = xxhash.xxh3_128()
    for b0, b1 in row_blocks(ref, item.row_begin, item.row_end, block_rows):
        raw = reader.read(ref, b0, b1)
        reader.hash_last(hasher)
        x = reader.widen(ref, raw, b0, scale)
        if len(ref.shape) >= 2:
            x = x.view(b1 - b0, *ref.shape[1:])
            x2d = x.reshape(b1 - b0, -1)
        else:
            x2d = x.reshape(-1, 1) if ref.shape else x.reshape(1, 1)
        whole.merge(kernel.moments(x))
        for spec, acc in zip(parts, part_m, strict=True):
            src = x2d if spec.dim == 0 else x.reshape(b1 - b0, ref.shape[1], -1)
            for piece in part_slices(spec, src, b0, b1):
                acc.merge(kernel.moments(piece.contiguous()))
    reader.release()
    return ItemResult(whole, part_m, hasher.digest())
