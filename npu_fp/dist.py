"""torchrun detection, process-group lifetime, and the few collectives the job uses.

The backend follows from the device (torch's own map gives gloo / nccl / hccl), so no vendor list
lives here. A plain single process (no torchrun) gets a `DistContext` with world size 1 and never
touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from npu_fp.device import Device, resolve_device

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class RankFailedError(ValueError):
    """A rank stopped answering (stopped, hung, dead) within `dist.timeout_s`; names the rank.

    A ValueError so the entry point reports it like every named error: one line, exit 2."""


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: Device
    backend: str | None = None  # None: single process, no process group
    timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for another rank at a synchronisation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when launched by torchrun, else None."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(k in os.environ for k in keys):
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError as e:
        raise ValueError(
            f"torchrun variables RANK/LOCAL_RANK/WORLD_SIZE must be integers: {e}"
        ) from e


def backend_for(device: Device) -> str:
    return dist.Backend.default_device_backend_map.get(device.type, "gloo")


@contextlib.contextmanager
def distributed(device_request: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """Initialise (when under torchrun), yield the rank's context, always tear down."""
    env = torchrun_env()
    if env is None:
        yield DistContext(0, 0, 1, resolve_device(device_request, 0))
        return
    rank, local_rank, world = env
    device = resolve_device(device_request, local_rank)
    backend = backend_for(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        spec = backend if device.type == "cpu" else f"{device.type}:{backend},cpu:gloo"
        kwargs: dict[str, Any] = {"backend": spec, "timeout": datetime.timedelta(seconds=timeout_s)}
        if device.type != "cpu":
            kwargs["device_id"] = device.torch
        dist.init_process_group(**kwargs)
    else:
        log.warning("process group already initialised; reusing it")
    ctx = DistContext(rank, local_rank, world, device, backend, timeout_s)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        if owns_group and dist.is_initialized():
            if ok:
                _closing_handshake(ctx)
            dist.destroy_process_group()


def ranks_on_host(ctx: DistContext) -> int:
    """Ranks sharing this host's RAM: torchrun's LOCAL_WORLD_SIZE, else every rank of the job."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)), 1)
    except ValueError:
        return max(ctx.world_size, 1)


def reduce_rows_to_main(ctx: DistContext, table: torch.Tensor) -> torch.Tensor:
    """Sum a [n_slots, n_fields] table onto rank 0, where each rank filled only its own slots.

    Every slot has exactly one writer and zeros elsewhere, so the sum is exact (x + 0 == x) and the
    result does not depend on the number of ranks. Point-to-point in rank order rather than
    `dist.reduce`: gloo frees a finished collective's work on a worker thread after the call
    returns, and a rank that reaches interpreter shutdown first aborts ("terminate called without
    an active exception", seen once in 10-36 three-rank launches); send / recv work is owned by the
    calling thread.
    """
    if not ctx.distributed:
        return table
    if ctx.is_main:
        buf = torch.empty_like(table)
        for src in range(1, ctx.world_size):
            recv_from(ctx, buf, src, "its results")
            table += buf
    else:
        dist.send(table.contiguous(), dst=0)
    return table


def recv_from(ctx: DistContext, buf: torch.Tensor, src: int, what: str) -> None:
    """`dist.recv` that names the silent rank: the process group's timeout (`dist.timeout_s`)
    bounds the wait, and gloo's own message says only which operation timed out."""
    try:
        dist.recv(buf, src=src)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RankFailedError(
            f"rank {src} did not send {what} to rank {ctx.rank} within dist.timeout_s="
            f"{ctx.timeout_s:g} s: it is stopped, hung or dead ({first}); its log is "
            f"logs/rank{src}.log. Partial results are kept: rerun the same command to resume"
        ) from None


def _closing_handshake(ctx: DistContext) -> None:
    """Every rank waits, without holding the GIL, until all ranks are done (see above)."""
    token = torch.zeros(1)
    if ctx.is_main:
        for src in range(1, ctx.world_size):
            recv_from(ctx, token, src, "its closing token")
        for dst in range(1, ctx.world_size):
            dist.send(token, dst=dst)
    else:
        dist.send(token, dst=0)
        recv_from(ctx, token, 0, "the closing token")


def gather_objects_to_main(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Small metadata (hash digests, logs) from every rank; rank 0 gets the list, others None."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def main_raises_everywhere(ctx: DistContext, error: BaseException | None) -> None:
    """Propagate a failure seen by any rank to all ranks, so nobody waits in a collective forever."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    # point-to-point through rank 0 rather than all_reduce, so a rank that never arrives is
    # named (recv_from) instead of ending in an anonymous collective timeout
    flag = torch.tensor([1.0 if error is not None else 0.0])
    if ctx.is_main:
        buf = torch.zeros(1)
        for src in range(1, ctx.world_size):
            recv_from(ctx, buf, src, "its status")
            flag = torch.maximum(flag, buf)
        for dst in range(1, ctx.world_size):
            dist.send(flag, dst=dst)
    else:
        dist.send(flag, dst=0)
        recv_from(ctx, flag, 0, "the job status")
    if error is not None:
        raise error
    if flag.item() > 0:
        raise RuntimeError("another rank failed; see its log under the run directory's logs/")
