"""The plan is a pure function: balanced, deterministic, groups together, segments fixed."""

from __future__ import annotations

import pytest

from npu_fp.arch.base import TensorRole
from npu_fp.io.safetensors_header import TensorRef
from npu_fp.plan import make_plan, segment_rows


def ref(name: str, rows: int, cols: int = 64, width: int = 2) -> TensorRef:
    return TensorRef(name, "/x", "BF16", (rows, cols), 0, rows * cols * width)


def moe_model(layers: int = 3, experts: int = 16, per_group: int = 2):
    refs, roles = [], {}
    for layer in range(layers):
        for e in range(experts):
            for part in ("gate", "up", "down"):
                n = f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"
                refs.append(ref(n, 32 + 8 * (e % 3)))
                roles[n] = TensorRole(n, f"moe.expert.{part}", layer, e, e // per_group)
        n = f"model.layers.{layer}.self_attn.q_proj.weight"
        refs.append(ref(n, 256))
        roles[n] = TensorRole(n, "attn.q", layer)
    return refs, roles


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_byte_assigned_once_and_balanced(world: int) -> None:
    refs = [ref(f"t{i}", 100 + 37 * i) for i in range(40)]
    plan = make_plan(refs, {}, world, segment_bytes=4096)
    assigned = sorted(i for idx in plan.assignment for i in idx)
    assert assigned == list(range(len(plan.items)))
    total = sum(r.nbytes for r in refs)
    assert sum(plan.bytes_per_rank()) == total
    biggest = max(it.nbytes for it in plan.items)
    # LPT bound: no rank exceeds the mean share by more than the largest unit
    assert max(plan.bytes_per_rank()) <= total / world + biggest


def test_deterministic() -> None:
    refs, roles = moe_model()
    a = make_plan(refs, roles, 3, 4096, expert_groups=True)
    b = make_plan(list(reversed(refs)), roles, 3, 4096, expert_groups=True)
    assert a == b


def test_segment_grid_does_not_depend_on_world_size() -> None:
    refs = [ref("big", 10_000), ref("small", 3)]
    grids = {
        w: [(it.tensor, it.row_begin, it.row_end) for it in make_plan(refs, {}, w, 65536).items]
        for w in (1, 2, 3, 7)
    }
    assert all(g == grids[1] for g in grids.values())
    assert len([g for g in grids[1] if g[0] == "big"]) > 1  # big tensor split by rows


def test_big_tensor_split_by_rows_covers_all_rows() -> None:
    r = ref("emb", 1000, cols=128)
    segs = segment_rows(r, 64 * 128 * 2)
    assert segs[0][0] == 0 and segs[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:], strict=False))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_expert_groups_stay_on_one_rank(world: int) -> None:
    refs, roles = moe_model()
    plan = make_plan(refs, roles, world, segment_bytes=512, expert_groups=True)
    owner: dict[str, set[int]] = {}
    for rank, idx in enumerate(plan.assignment):
        for i in idx:
            it = plan.items[i]
            if it.bundle:
                owner.setdefault(it.bundle, set()).add(rank)
                assert it.num_segments == 1  # a bundled tensor is never split
    assert len(owner) == 3 * 8
    assert all(len(r) == 1 for r in owner.values())
    groups_per_rank = [len(b) for b in plan.bundles_per_rank()]
    assert max(groups_per_rank) - min(groups_per_rank) <= 2


def test_invalid_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        make_plan([ref("a", 1)], {}, 0, 4096)
