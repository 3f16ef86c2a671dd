"""Validity of the decisive tests: exact permutation bounds, argument-order symmetry, and no
evidence from degenerate (zero, constant) weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from compare_fixtures import SHAPE, run_compare, write_base
from safetensors.torch import load_file, save_file

from npu_fp import derive
from npu_fp.compare.exact import chatterjee_logp, degenerate, identity_test
from npu_fp.compare.units import SALT, match, reduce_dims


def _assert_valid_under_permutations(
    a: torch.Tensor, b: torch.Tensor, g: torch.Generator, times: int
) -> None:
    """P(bound <= level) <= level over uniform permutations of B's units."""
    logps = []
    for _ in range(times):
        t = identity_test([a], [b[torch.randperm(b.shape[0], generator=g)]])
        assert t is not None
        logps.append(t["log_p"])
    ps = np.exp(np.array(logps))
    for level in (0.5, 0.1, 0.05):
        assert (ps <= level).mean() <= level


def test_chatterjee_bound_is_a_valid_p_value_under_random_permutations() -> None:
    """Under a uniform permutation of B's units the bound never falls below the exact
    permutation tail: P(bound <= level) <= level for every level."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    b = a + 0.8 * torch.randn(64, 32, generator=g)  # strongly related at the identity
    _assert_valid_under_permutations(a, b, g, 400)
    unpermuted = identity_test([a], [b])
    assert unpermuted is not None and unpermuted["log_p"] < math.log(1e-6)


def test_identity_on_projected_rows_keeps_the_permutation_null() -> None:
    """Compare projects FFN rows with one seeded matrix for both models before the identity
    test: a fixed function of each row, so the bound stays valid under random permutations and
    a derivative is still found."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(96, 512, generator=g)
    b = a + 1.5 * torch.randn(96, 512, generator=g)
    pa, pb = reduce_dims(a, 64, SALT["up"]), reduce_dims(b, 64, SALT["up"])
    assert pa.shape == (96, 64)
    _assert_valid_under_permutations(pa, pb, g, 300)
    same_index = identity_test([pa], [pb])
    assert same_index is not None and same_index["log_p"] < math.log(1e-6)


def test_match_rule_lap_for_small_blocks_argmax_above() -> None:
    """Blocks of at most lap_max units get the exact LAP optimum (also when the argmax is
    contested), larger blocks the row argmax."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(2)
    pool = torch.randn(300, 16, generator=g)
    for noise in (0.1, 3.0):  # uncontested argmax (LAP skipped) and contested argmax (LAP run)
        block = pool[:40] + noise * torch.randn(40, 16, generator=g)
        got, method = match(block, pool, lap_max=64)
        xn = block / block.norm(dim=1, keepdim=True)
        yn = pool / pool.norm(dim=1, keepdim=True)
        c = (xn @ yn.t()).double().numpy()
        rows, cols = linear_sum_assignment(c, maximize=True)
        assert method == "lap"
        assert c[np.arange(40), got].sum() == pytest.approx(c[rows, cols].sum(), abs=1e-9)
        assert len(set(got.tolist())) == 40
    got, method = match(block, pool, lap_max=32)
    assert method == "argmax"
    assert (got == c.argmax(axis=1)).all()


def test_chatterjee_bound_edge_cases() -> None:
    assert chatterjee_logp(1.0, 2.0) == 0.0
    assert chatterjee_logp(100.0, 1.0) < math.log(1e-20)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: torch.zeros(8, 16), "all-zero"),
        (lambda: torch.ones(8, 16), "constant"),
        (lambda: torch.outer(torch.arange(1.0, 9.0), torch.ones(16)), "rank-one"),
        (lambda: torch.full((8, 16), float("nan")), "non-finite"),
    ],
)
def test_degenerate_blocks_are_named(make, why: str) -> None:
    reason = degenerate(make())
    assert reason is not None and why in reason
    assert degenerate(torch.randn(8, 16)) is None


def _degenerate_copy(base: Path, out: Path, fill: float) -> Path:
    derive.resave(base, out, torch.float32)
    tensors = load_file(str(out / "model.safetensors"))
    save_file(
        {k: torch.full_like(v, fill) for k, v in tensors.items()}, str(out / "model.safetensors")
    )
    return out


@pytest.mark.slow
def test_zero_and_constant_models_are_never_related(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base", 11)
    zero = _degenerate_copy(base, tmp_path / "zero", 0.0)
    const = _degenerate_copy(base, tmp_path / "const", 0.02)
    other = write_base(tmp_path / "other", 12)
    doc = run_compare([base, zero, const, other], tmp_path / "out")
    assert set(doc["timing"]["phases_s"]) == {"align", "sketch", "layers"}
    for p in doc["pairs"]:
        assert p["verdict"] != "related", (p["a"], p["b"], p["reason"])
    ez = next(p for p in doc["pairs"] if {p["a"], p["b"]} == {"base", "zero"})
    excluded = [x for e in ez["evidence"] for x in e.get("excluded", [])]
    assert excluded and any("zero" in x["why"] for x in excluded)


@pytest.mark.slow
def test_verdict_and_p_value_do_not_depend_on_argument_order(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base", 21)
    perm = derive.permute(base, tmp_path / "perm", 22, hidden=True)
    other = write_base(tmp_path / "other", 23)
    ab = run_compare([base, perm, other], tmp_path / "ab")
    ba = run_compare([other, perm, base], tmp_path / "ba")

    def key(doc: dict) -> dict:
        return {frozenset((p["a"], p["b"])): (p["verdict"], p["log10_p"]) for p in doc["pairs"]}

    assert key(ab) == key(ba)
    assert key(ab)[frozenset(("base", "perm"))][0] == "related"
    assert SHAPE["num_hidden_layers"] == 4


def test_a_pool_over_max_pool_units_is_named_in_the_report(tmp_path: Path) -> None:
    """Pools are sized from header shapes; one too large is never skipped silently."""
    base = write_base(tmp_path / "base")
    moge = derive.moge_upcycle(base, tmp_path / "moge")
    doc = run_compare([base, moge], tmp_path / "out", max_pool_units=8)
    [pair] = doc["pairs"]
    [fam] = [e for e in pair["evidence"] if e["kind"] == "expert_units"]
    assert fam["log10_p"] is None and not fam["powered"]
    assert "compare.max_pool_units=8" in fam["summary"] and "128 units" in fam["summary"]
    assert [x["why"] for x in fam["excluded"]][0] == fam["summary"].split(": ", 1)[1]


def test_moe_vs_moe_over_max_pool_units_is_prematched_not_skipped(tmp_path: Path) -> None:
    """Two MoGE models upcycled from one base (experts cut from 4 different FFN slices), with a
    pool too big to match whole: each expert is matched into the experts its sketch picks, which
    must be those cut from the same slice for the expert test to decide."""
    base = write_base(tmp_path / "base")
    one = derive.moge_upcycle(base, tmp_path / "one", 5)
    two = derive.moge_upcycle(base, tmp_path / "two", 6)  # 16 experts of 32 units + 128 shared
    doc = run_compare([one, two], tmp_path / "out", max_pool_units=100)
    [pair] = doc["pairs"]
    [fam] = [e for e in pair["evidence"] if e["kind"] == "expert_units"]
    assert "1 to 3 most similar experts by Gram sketch" in fam["summary"], fam["summary"]
    assert fam["log10_p"] < -6
