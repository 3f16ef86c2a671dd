"""Rank 0's finishing step: merged moments -> per-tensor rows and the per-layer role table.

MoE experts are aggregated per layer and role (mean and spread of per-expert std, and the std of
all experts pooled together), and again per MoGE group. Router, router bias / scale and shared
experts keep their own roles, so they never blur into the expert aggregate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from npu_fp.arch.base import EXPERT_FFN, TensorRole
from npu_fp.io.safetensors_header import CheckpointError, TensorRef
from npu_fp.stats.moments import Moments, finish

EXPERT_ROLES = EXPERT_FFN


@dataclass(frozen=True, slots=True)
class TensorStats:
    ref: TensorRef
    role: TensorRole
    part: str | None  # None: the whole tensor
    part_role: str  # role of this row (the part's role for a fused part)
    moments: Moments
    digest: str | None  # content hash of the whole tensor's stored bytes


def checked_finish(ts: TensorStats) -> dict:
    """`finish`, or a named error when finite weights overflow float64 moments.

    Fourth powers overflow past |x| ~ 1e77 (F64 tensors only: no other dtype reaches that), and
    a signature must hold finite numbers; such a tensor is corrupted or hostile, not a weight.
    """
    m = ts.moments
    try:
        f = finish(m)
        ok = all(not isinstance(v, float) or math.isfinite(v) for v in f.values())
        if m.n:
            ok = ok and all(math.isfinite(v) for v in (m.m2, m.m3, m.m4))
    except (OverflowError, ZeroDivisionError):
        ok = False
    if not ok:
        big = max(abs(m.min), abs(m.max))
        raise CheckpointError(
            f"{ts.ref.file}: tensor {ts.ref.name!r}: {ts.ref.dtype} values up to |x| = {big:.3g} "
            "overflow float64 moments (fourth powers); weights of magnitude above ~1e75 are not "
            "supported"
        )
    return f


def tensor_row(ts: TensorStats) -> dict:
    r = ts.role
    return {
        "name": ts.ref.name,
        "layer": r.layer,
        "role": ts.part_role,
        "expert": r.expert,
        "group": r.group,
        "part": ts.part or "",
        "kind": r.kind,
        "dtype": ts.ref.dtype,
        "shape": list(ts.ref.shape),
        "norm_offset": r.norm_offset,
        "transposed": r.transposed,
        **checked_finish(ts),
        "hash": ts.digest or "",
    }


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def layer_table(stats: list[TensorStats]) -> list[dict]:
    """One row per (layer, role) and, for experts, per (layer, role, group). Sorted by layer."""
    plain: dict[tuple[int, str], list[TensorStats]] = {}
    experts: dict[tuple[int, str, int | None], list[TensorStats]] = {}
    for ts in stats:
        if ts.role.layer is None or ts.role.kind != "weight":
            continue
        if ts.part_role in EXPERT_ROLES:
            experts.setdefault((ts.role.layer, ts.part_role, None), []).append(ts)
            if ts.role.group is not None:
                experts.setdefault((ts.role.layer, ts.part_role, ts.role.group), []).append(ts)
        else:
            plain.setdefault((ts.role.layer, ts.part_role), []).append(ts)
    rows = []
    for (layer, role), group in plain.items():
        pooled = Moments()
        for ts in group:
            pooled.merge(ts.moments)
        f = finish(pooled)
        rows.append(_layer_row(layer, role, None, len(group), f, None, None))
    for (layer, role, grp), group in experts.items():
        pooled = Moments()
        stds = []
        for ts in sorted(group, key=lambda t: t.role.expert or 0):
            pooled.merge(ts.moments)
            s = finish(ts.moments)["std"]
            if s is not None:
                stds.append(float(s))
        f = finish(pooled)
        mean_std = sum(stds) / len(stds) if stds else None
        rows.append(_layer_row(layer, role, grp, len(group), f, mean_std, _spread(stds)))
    rows.sort(key=lambda r: (r["layer"], r["role"], -1 if r["group"] is None else r["group"]))
    return rows


def _layer_row(
    layer: int,
    role: str,
    group: int | None,
    count: int,
    f: dict,
    expert_std_mean: float | None,
    expert_std_spread: float | None,
) -> dict:
    return {
        "layer": layer,
        "role": role,
        "group": group,
        "tensors": count,
        "numel": f["numel"],
        "mean": f["mean"],
        "std": f["std"],
        "rms": f["rms"],
        "absmax": f["absmax"],
        "max": f["max"],
        "kurtosis": f["kurtosis"],
        "expert_std_mean": expert_std_mean,
        "expert_std_spread": expert_std_spread,
    }
