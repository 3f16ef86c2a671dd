"""Per work item: stream bytes -> device -> mergeable moments, for the whole tensor and its parts.

The kernel widens fixed-size chunks into a reused float64 device buffer and takes sum, min/max and
the centred powers there (environment-notes.md section 6.3: one pass per chunk into a reused buffer
beats `torch.std` by ~8x on CPU and keeps errors below 1e-13). All chunk results of a block leave the
device in one transfer. Chunk and block grids depend only on the config and the tensor, so a segment
gives the same bits on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from npu_fp.arch.base import PartSpec, TensorRole
from npu_fp.device import Device, to_device_float
from npu_fp.io.reader import RowReader, row_blocks
from npu_fp.io.safetensors_header import TensorRef
from npu_fp.plan import WorkItem
from npu_fp.stats.moments import Moments


class MomentKernel:
    def __init__(self, device: Device, chunk_elems: int = 1 << 18) -> None:
        if device.type == "cpu":
            # Chunks are cache-sized; intra-op threads only add synchronisation (measured 100x
            # slower with 2 OpenMP threads on 256K-element ops). Ranks are the CPU parallelism.
            torch.set_num_threads(1)
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
        rows = torch.stack([self._chunk(p) for p in pieces]).tolist()
        for piece, (s, mn, mx, m2, m3, m4) in zip(pieces, rows, strict=True):
            k = piece.numel()
            if s != s or s in (float("inf"), float("-inf")):
                total.merge(self._nonfinite_chunk(piece))
                continue
            total.merge(Moments(float(k), s / k, m2, m3, m4, mn, mx))
        return total

    def _chunk(self, piece: torch.Tensor) -> torch.Tensor:
        k = piece.numel()
        a = self._a[:k]
        a.copy_(piece)
        s = a.sum()
        # min/max on the narrow source: half the bytes of the float64 copy, and exact
        mn, mx = torch.aminmax(piece)
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
            s, mn, mx, m2, m3, m4 = self._chunk(a).tolist()
            m.merge(Moments(float(a.numel()), s / a.numel(), m2, m3, m4, mn, mx))
        return m


@dataclass(slots=True)
class ItemResult:
    whole: Moments
    parts: list[Moments]  # aligned with role.parts
    digest: bytes  # xxh3-128 of the segment's stored bytes


def part_slices(spec: PartSpec, x: torch.Tensor, row_begin: int, row_end: int) -> list[torch.Tensor]:
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
    row_bytes = ref.nbytes // ref.rows if ref.rows else 0
    block_rows = max(1, read_bytes // max(row_bytes, 1))
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
