"""Profile scores: the seed HonestAGI construction exactly, variants, raw scales, bank nulls."""

from __future__ import annotations

import numpy as np
import pytest

from npu_fp.compare.profiles import (
    bank_null,
    calibrate,
    honestagi_score,
    profile_scores,
    raw_scales,
)
from npu_fp.signature import Signature

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o")


def fake_sig(
    curves: dict[str, list[float]],
    name: str = "m",
    maxes: dict | None = None,
    means: dict | None = None,
    offset: float = 0.0,
) -> Signature:
    n = max(len(v) for v in curves.values())
    layers = []
    for role, vals in curves.items():
        for i, v in enumerate(vals):
            layers.append(
                {
                    "layer": i,
                    "role": role,
                    "group": None,
                    "std": v,
                    "max": (maxes or {}).get(role, vals)[i],
                    "absmax": abs((maxes or {}).get(role, vals)[i]),
                    "mean": (means or {}).get(role, [1.0] * n)[i],
                }
            )
    tensors = [{"name": f"{r}.w", "role": r, "norm_offset": offset} for r in curves]
    doc = {"identity": {"name": name, "num_layers": n}, "layers": layers, "tensors": tensors}
    return Signature(doc)


def seed_formula(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """The published statistic written out independently (fingerprint-methods.md 1.2)."""
    rs = []
    for t in ROLES:
        sa, sb = np.asarray(a[t]), np.asarray(b[t])
        za, zb = (sa - sa.mean()) / sa.std(), (sb - sb.mean()) / sb.std()
        if len(za) != len(zb):
            short, long_ = (za, zb) if len(za) < len(zb) else (zb, za)
            short = np.interp(
                np.linspace(0, len(short) - 1, len(long_)), np.arange(len(short)), short
            )
            za, zb = (short, long_) if len(a[t]) < len(b[t]) else (long_, short)
        rs.append(np.corrcoef(za, zb)[0, 1])
    return float(np.mean(rs))


def test_honestagi_exact_same_depth_and_interpolated() -> None:
    rng = np.random.default_rng(0)
    a = {t: list(rng.uniform(0.01, 0.03, 12)) for t in ROLES}
    b = {t: list(np.asarray(a[t]) * 1.7 + rng.normal(0, 0.002, 12)) for t in ROLES}
    c = {t: list(rng.uniform(0.01, 0.03, 7)) for t in ROLES}
    assert honestagi_score(fake_sig(a), fake_sig(b)) == pytest.approx(seed_formula(a, b), abs=1e-12)
    assert honestagi_score(fake_sig(a), fake_sig(c)) == pytest.approx(seed_formula(a, c), abs=1e-12)
    assert honestagi_score(fake_sig(c), fake_sig(a)) == pytest.approx(seed_formula(c, a), abs=1e-12)
    # affine rescaling of a profile does not change the score (Pearson after z-scoring)
    assert honestagi_score(fake_sig(a), fake_sig(b)) > 0.9


def test_variants_and_missing_roles() -> None:
    depth = np.linspace(0, 1, 10)
    trend = {t: list(0.02 + 0.01 * depth) for t in ROLES}
    wiggle = {
        t: list(0.02 + 0.01 * depth + 0.001 * np.sin(7 * depth + i)) for i, t in enumerate(ROLES)
    }
    s = profile_scores(fake_sig(trend), fake_sig(wiggle))
    # a shared trend inflates Pearson; first differences remove it
    assert s["honestagi"] > 0.9 and s["honestagi_spearman"] > 0.8
    assert s["honestagi_diff"] is not None and s["honestagi_diff"] < s["honestagi"]
    assert s["biases"] is None and s["ffn"] is None
    short = {t: [0.01, 0.02] for t in ROLES}
    assert honestagi_score(fake_sig(trend), fake_sig(short)) is None  # 2 layers: no score


def test_raw_scales_keep_the_bias_magnitude_gap() -> None:
    n = 8
    curves = {"attn.q": [0.02] * n, "attn.k_bias": list(np.linspace(1, 3, n))}
    big = fake_sig(curves, maxes={"attn.k_bias": list(np.linspace(5, 25, n))})
    small = fake_sig(curves, maxes={"attn.k_bias": list(np.linspace(0.01, 0.04, n))})
    raw = raw_scales(big, small)["attn.k_bias"]
    assert raw["max_ratio"] == pytest.approx(15 / 0.025, rel=1e-6)
    assert raw["max_pearson"] == pytest.approx(
        1.0
    )  # same shape, ~600x scale: only the ratio shows it


def test_norm_offset_is_undone() -> None:
    n = 6
    curves = {"norm.input": [0.1] * n}
    gemma = fake_sig(curves, means={"norm.input": [0.05] * n}, offset=1.0)
    llama = fake_sig(curves, means={"norm.input": [1.05] * n})
    ra = raw_scales(gemma, llama)["norm.input"]
    assert ra["centred_gain_mean_a"] == pytest.approx(ra["centred_gain_mean_b"])


def test_bank_null_calibrates_and_absence_is_marked() -> None:
    rng = np.random.default_rng(3)
    bank = [
        fake_sig({t: list(rng.uniform(0.01, 0.03, 10)) for t in ROLES}, f"b{i}") for i in range(6)
    ]
    null = bank_null(bank)
    assert len(null["honestagi_score"]) == 15
    cal = calibrate({"honestagi_score": 0.99}, null)["honestagi_score"]
    assert cal["calibrated"] and cal["p_empirical"] == pytest.approx(1 / 16) and cal["z"] > 2
    assert calibrate({"honestagi_score": 0.99}, None)["honestagi_score"] == {"calibrated": False}
