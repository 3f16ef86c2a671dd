"""Which rank reads which bytes: a pure, deterministic function of the tensors and the world size.

Tensors are cut into row segments on a grid that depends only on the tensor (`plan.segment_bytes`),
never on the number of ranks; segments are then spread over ranks longest-first by bytes. With
`plan.expert_groups=true` every tensor of one MoE expert group (MoGE: one group per device) is one
indivisible unit, so a group's experts land on one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from npu_fp.arch.base import TensorRole
from npu_fp.io.safetensors_header import TensorRef


@dataclass(frozen=True, slots=True)
class WorkItem:
    tensor: str
    segment: int  # index of this row segment within the tensor
    num_segments: int
    row_begin: int
    row_end: int
    nbytes: int
    bundle: str | None  # expert-group key when the item must stay with its group


@dataclass(frozen=True, slots=True)
class Plan:
    world_size: int
    items: tuple[WorkItem, ...]  # global order: by tensor name, then segment
    assignment: tuple[tuple[int, ...], ...]  # per rank: indices into `items`, in global order

    def bytes_per_rank(self) -> list[int]:
        return [sum(self.items[i].nbytes for i in idx) for idx in self.assignment]

    def bundles_per_rank(self) -> list[list[str]]:
        out = []
        for idx in self.assignment:
            seen: dict[str, None] = {}
            for i in idx:
                if self.items[i].bundle is not None:
                    seen.setdefault(self.items[i].bundle, None)
            out.append(list(seen))
        return out


def longest_first(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of `costs` per rank: the largest first, each onto the least-loaded rank (ties go
    to the lower index and the lower rank); each rank's list sorted. A pure function of the
    costs, shared by the fingerprint plan and compare's phases."""
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(i)
        loads[rank] += costs[i]
    return [sorted(o) for o in owned]


def segment_rows(ref: TensorRef, segment_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of the tensor's fixed segment grid."""
    rows = ref.rows
    if rows == 0 or ref.nbytes <= segment_bytes:
        return [(0, rows)]
    row_bytes = ref.nbytes // rows
    per = max(1, segment_bytes // max(row_bytes, 1))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def bundle_key(role: TensorRole | None) -> str | None:
    if role is None or role.layer is None:
        return None
    if role.group is not None:
        return f"layer{role.layer}.group{role.group}"
    if role.expert is not None:
        return f"layer{role.layer}.expert{role.expert}"
    return None


def make_plan(
    refs: list[TensorRef],
    roles: dict[str, TensorRole],
    world_size: int,
    segment_bytes: int,
    expert_groups: bool = False,
) -> Plan:
    if world_size <= 0:
        raise ValueError(f"world_size must be > 0, got {world_size}")
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise ValueError("make_plan: duplicate tensor names in refs")
    items: list[WorkItem] = []
    for ref in sorted(refs, key=lambda r: r.name):
        key = bundle_key(roles.get(ref.name)) if expert_groups else None
        # a bundled tensor is never split: the whole group must stay on one device
        ranges = [(0, ref.rows)] if key is not None else segment_rows(ref, segment_bytes)
        row_bytes = ref.nbytes // ref.rows if ref.rows else 0
        for s, (r0, r1) in enumerate(ranges):
            nbytes = ref.nbytes if len(ranges) == 1 else (r1 - r0) * row_bytes
            items.append(WorkItem(ref.name, s, len(ranges), r0, r1, nbytes, key))

    # units: a whole bundle, or one segment
    units: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        units.setdefault(it.bundle if it.bundle is not None else f"#{i}", []).append(i)
    groups = list(units.values())
    per_rank = longest_first([sum(items[i].nbytes for i in idx) for idx in groups], world_size)
    owned = [sorted(i for u in unit_ids for i in groups[u]) for unit_ids in per_rank]
    return Plan(world_size, tuple(items), tuple(tuple(o) for o in owned))


def format_plan(plan: Plan, total_bytes: int) -> str:
    lines = [
        f"plan: {len(plan.items)} work items over {plan.world_size} ranks, "
        f"{total_bytes / 2**30:.3f} GiB"
    ]
    for rank, (b, bundles, idx) in enumerate(
        zip(plan.bytes_per_rank(), plan.bundles_per_rank(), plan.assignment, strict=True)
    ):
        share = b / total_bytes if total_bytes else 0.0
        lines.append(
            f"  rank {rank}: {b / 2**30:9.3f} GiB ({share:6.1%}), {len(idx)} items, "
            f"{len(bundles)} expert groups"
            + (
                f" [{', '.join(bundles[:4])}{', ...' if len(bundles) > 4 else ''}]"
                if bundles
                else ""
            )
        )
    return "\n".join(lines)
