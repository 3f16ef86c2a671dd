"""The plan is a pure function: balanced, deterministic, groups together, segments fixed."""

from __future__ import annotations

import pytest

from npu_fp.arch.base import TensorRole
from npu_fp.io.safetensors_header import TensorRef
from npu_fp.plan import longest_first, make_plan, segment_rows


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


def test_longest_first_by_hand() -> None:
    # 5 -> r0; 3 -> r1; 3 -> r1 (3 < 5); 2 -> r0 (5 < 6); 1 -> r1 (6 < 7)
    assert longest_first([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]
    # ties go to the lower index and the lower rank; more ranks than items leave ranks empty
    assert longest_first([1, 1, 1], 2) == [[0, 2], [1]]
    assert longest_first([4], 3) == [[0], [], []]
    assert longest_first([], 2) == [[], []]


def test_longest_first_balances_within_graham_bound() -> None:
    import random

    rng = random.Random(0)
    for _ in range(50):
        costs = [rng.randint(0, 1000) for _ in range(rng.randint(1, 40))]
        world = rng.randint(1, 6)
        out = longest_first(costs, world)
        assert sorted(i for r in out for i in r) == list(range(len(costs)))
        loads = [sum(costs[i] for i in r) for r in out]
        # LPT is within 4/3 of the optimum, which is at least max(mean load, largest item)
        lower = max(sum(costs) / world, max(costs))
        assert max(loads) <= 4 / 3 * lower + 1e-9


def test_plan_and_compare_share_the_assignment() -> None:
    import inspect

    from npu_fp.compare import job

    refs = [ref(f"t{i}", 10 * (i % 4 + 1), 8) for i in range(9)]
    plan = make_plan(refs, {}, 3, 1 << 20)
    costs = [it.nbytes for it in plan.items]
    assert [list(a) for a in plan.assignment] == longest_first(costs, 3)
    assert "longest_first(" in inspect.getsource(job._run_phase)
