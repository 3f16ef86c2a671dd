"""Spreading the layer-streamed forward over ranks: data-parallel over batches, or a pipeline.

- data: rank r takes batches r, r + W, r + 2W, ...; every rank streams all layers.
- pipeline: rank r holds a contiguous stage of layers (balanced by bytes); rank 0 embeds, each rank
  runs its stage over a pass of batches and sends the hidden states to the next rank with
  torch.distributed point-to-point, so stage r works on pass p while stage r - 1 works on pass p + 1.

Both fill disjoint slots of the same tables, which are then summed onto rank 0 (exact: each slot has
one writer). The plans are pure functions, tested without a process group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from npu_fp.dist import DistContext, reduce_rows_to_main
from npu_fp.forward.errors import ActivationInputError
from npu_fp.forward.layers import StreamModel
from npu_fp.forward.stream import LayerStreamer, NormTables

log = logging.getLogger(__name__)


def assign_batches(num_batches: int, world_size: int, rank: int) -> list[int]:
    """Data mode: the batches of one rank (strided, so ranks differ by at most one batch)."""
    return list(range(rank, num_batches, world_size))


def pipeline_stages(layer_bytes: Sequence[int], world_size: int) -> list[range]:
    """Contiguous layer ranges, one per rank, with byte totals as even as a greedy cut allows."""
    n = len(layer_bytes)
    if world_size > n:
        raise ActivationInputError(
            f"activations.mode=pipeline needs at least one layer per rank: {n} layers for "
            f"{world_size} ranks; use fewer ranks or activations.mode=data"
        )
    stages: list[range] = []
    start = 0
    remaining = float(sum(layer_bytes))
    for r in range(world_size):
        ranks_left = world_size - r
        if ranks_left == 1:
            stages.append(range(start, n))
            break
        target = remaining / ranks_left
        stop, acc = start, 0.0
        # take layers while the next one brings the stage closer to its share, leaving one per rank
        while stop < n - (ranks_left - 1):
            nxt = acc + layer_bytes[stop]
            if stop > start and abs(nxt - target) > abs(acc - target):
                break
            acc = nxt
            stop += 1
        stages.append(range(start, stop))
        remaining -= acc
        start = stop
    return stages


def chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def run_data(
    ctx: DistContext,
    model: StreamModel,
    ids: torch.Tensor,
    streamer: LayerStreamer,
    pass_batches: int,
) -> None:
    mine = assign_batches(ids.shape[0], ctx.world_size, ctx.rank)
    layers = range(model.num_layers)
    for n, slots in enumerate(chunks(mine, pass_batches)):
        hidden = [model.embed(ids[b]) for b in slots]
        streamer.run(hidden, slots, layers)
        log.info(
            "rank %d: pass %d done (%d of %d batches)",
            ctx.rank,
            n,
            min((n + 1) * pass_batches, len(mine)),
            len(mine),
        )
    streamer.release()


def run_pipeline(
    ctx: DistContext,
    model: StreamModel,
    ids: torch.Tensor,
    streamer: LayerStreamer,
    pass_batches: int,
    stages: list[range],
) -> None:
    stage = stages[ctx.rank]
    first, last = ctx.rank == 0, ctx.rank == ctx.world_size - 1
    b, t = int(ids.shape[1]), int(ids.shape[2])
    shape = (b, t, model.hidden_size)
    pending: list = []
    for n, slots in enumerate(chunks(range(ids.shape[0]), pass_batches)):
        if first:
            hidden = [model.embed(ids[s]) for s in slots]
        else:
            hidden = []
            for _ in slots:
                h = torch.empty(shape, dtype=model.dtype, device=model.device.torch)
                dist.recv(h, src=ctx.rank - 1)
                hidden.append(h)
        streamer.run(hidden, slots, stage)
        if not last:
            for req in pending:
                req.wait()
            pending = [dist.isend(h.contiguous(), dst=ctx.rank + 1) for h in hidden]
        log.info(
            "rank %d: stage layers %d-%d, pass %d done", ctx.rank, stage.start, stage.stop - 1, n
        )
    for req in pending:
        req.wait()
    streamer.release()


def reduce_tables(ctx: DistContext, tables: NormTables) -> NormTables:
    """Sum every rank's tables onto rank 0 (exact: each slot has one writer); see dist.py for why
    this is point-to-point and how the job's teardown keeps ranks alive until rank 0 is done."""
    tables.norms = reduce_rows_to_main(ctx, tables.norms)
    tables.routing = reduce_rows_to_main(ctx, tables.routing)
    return tables
