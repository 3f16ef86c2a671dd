"""Profile scores from signatures: the HonestAGI statistic exactly, its variants, raw scales.

`honestagi_score` is the published construction (HonestAGI's parameter profile): per-layer std of
Q, K, V, O; z-scored across layers; the shorter profile resampled onto the longer with `np.interp`
at `linspace(0, L_short - 1, L_long)`; Pearson per matrix type; the mean of the four. The same
construction runs on q/k/v biases, attention / FFN norms, the FFN and the pooled MoE experts, with
Spearman and first-difference (detrended) variants. Raw-scale ratios and the per-layer q/k/v bias
signed max and max|x| keep the scale that normalisation hides. The same construction on per-layer
activation norms lives in `activation_profiles`.

Profile scores are screening only: they never decide a verdict. With a bank of signatures of
known-independent models each score gets an empirical null (z and p); without one it is marked
uncalibrated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats

from npu_fp.arch.base import ATTENTION, DENSE_FFN, EXPERT_FFN, LAYER_NORMS, QKV_BIASES
from npu_fp.signature import Signature, SignatureError, load_signature

log = logging.getLogger(__name__)

ATTN = ATTENTION
BIASES = QKV_BIASES
NORMS = LAYER_NORMS[:2]  # the pre-norms every family has
MIN_LAYERS = 3
Corr = Callable[[np.ndarray, np.ndarray], float]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.spearmanr(x, y)[0])


# (key suffix, correlation, first differences): the seed construction and its two variants
VARIANTS: tuple[tuple[str, Corr, bool], ...] = (
    ("", _pearson, False),
    ("_spearman", _spearman, False),
    ("_diff", _pearson, True),
)


def curve(sig: Signature, role: str, stat: str = "std") -> np.ndarray | None:
    """Per-layer values (layers lacking the role dropped); None with fewer than MIN_LAYERS."""
    vals = [v for v in sig.profile(role, stat) if v is not None and math.isfinite(v)]
    return np.asarray(vals, dtype=np.float64) if len(vals) >= MIN_LAYERS else None


def _z(x: np.ndarray) -> np.ndarray | None:
    sd = x.std()
    return None if sd == 0 else (x - x.mean()) / sd


def resample(x: np.ndarray, n: int) -> np.ndarray:
    """The published resampling: np.interp at linspace(0, len - 1, n)."""
    if len(x) == n:
        return x
    return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)


def construct(
    a: np.ndarray | None, b: np.ndarray | None, corr: Corr = _pearson, diff: bool = False
) -> float | None:
    if a is None or b is None:
        return None
    za, zb = _z(a), _z(b)
    if za is None or zb is None:
        return None
    n = max(len(za), len(zb))
    za, zb = resample(za, n), resample(zb, n)
    if diff:
        za, zb = np.diff(za), np.diff(zb)
        if len(za) < 2 or za.std() == 0 or zb.std() == 0:
            return None
    r = corr(za, zb)
    return r if math.isfinite(r) else None


def ffn_roles(sig: Signature) -> tuple[str, ...]:
    return DENSE_FFN if curve(sig, "mlp.up") is not None else EXPERT_FFN


def _family_roles(a: Signature, b: Signature) -> dict[str, tuple[tuple[str, str], ...]]:
    fa, fb = ffn_roles(a), ffn_roles(b)
    fam = {
        "honestagi": tuple((r, r) for r in ATTN),
        "biases": tuple((r, r) for r in BIASES),
        "norms": tuple((r, r) for r in NORMS),
        "ffn": tuple(zip(fa, fb, strict=True)),
    }
    if fa == EXPERT_FFN and fb == EXPERT_FFN:
        fam["experts"] = tuple((r, r) for r in EXPERT_FFN)
    return fam


def honestagi_score(a: Signature, b: Signature) -> float | None:
    """The seed score: mean over Q, K, V, O of Pearson of z-scored per-layer std profiles."""
    rs = [construct(curve(a, r), curve(b, r)) for r in ATTN]
    return None if any(r is None for r in rs) else float(np.mean(rs))


def profile_scores(a: Signature, b: Signature) -> dict[str, float | None]:
    """Every score, keyed `<family>`, `<family>_spearman`, `<family>_diff` (+ `honestagi_score`)."""
    out: dict[str, float | None] = {"honestagi_score": honestagi_score(a, b)}
    for fam, pairs in _family_roles(a, b).items():
        for suffix, corr, diff in VARIANTS:
            rs = [construct(curve(a, ra), curve(b, rb), corr, diff) for ra, rb in pairs]
            rs = [r for r in rs if r is not None]
            out[fam + suffix] = float(np.mean(rs)) if rs else None
    bias = [construct(curve(a, r, "max"), curve(b, r, "max")) for r in BIASES]
    bias = [r for r in bias if r is not None]
    out["bias_max_curve"] = float(np.mean(bias)) if bias else None
    return out


def _norm_offset(sig: Signature, role: str) -> float:
    for row in sig.tensors:
        if row.get("role") == role:
            return float(row.get("norm_offset") or 0.0)
    return 0.0


def raw_scales(a: Signature, b: Signature) -> dict[str, dict]:
    """Model-to-model ratios of raw statistics, and the bias maxima (the counter-analysis)."""
    out: dict[str, dict] = {}
    fa, fb = ffn_roles(a), ffn_roles(b)
    pairs = [(r, r) for r in (*ATTN, *BIASES)] + list(zip(fa, fb, strict=True))
    for ra, rb in pairs:
        ca, cb = curve(a, ra), curve(b, rb)
        if ca is None or cb is None:
            continue
        row = {"std_a": float(np.median(ca)), "std_b": float(np.median(cb))}
        if row["std_b"] > 0 and row["std_a"] > 0:
            row["log10_ratio"] = math.log10(row["std_a"] / row["std_b"])
        if ra in BIASES:
            for stat in ("max", "absmax"):
                ma, mb = curve(a, ra, stat), curve(b, rb, stat)
                if ma is None or mb is None:
                    continue
                row[f"{stat}_mean_a"], row[f"{stat}_mean_b"] = float(ma.mean()), float(mb.mean())
                if mb.mean() != 0:
                    row[f"{stat}_ratio"] = float(ma.mean() / mb.mean())
                row[f"{stat}_pearson"] = construct(ma, mb)
        out[ra if ra == rb else f"{ra}|{rb}"] = row
    for role in NORMS:
        ma, mb = curve(a, role, "mean"), curve(b, role, "mean")
        if ma is None or mb is None:
            continue
        # gains centred on 0 whatever the family (Gemma stores w with (1 + w) applied)
        ga = ma + _norm_offset(a, role) - 1.0
        gb = mb + _norm_offset(b, role) - 1.0
        out[role] = {
            "centred_gain_mean_a": float(ga.mean()),
            "centred_gain_mean_b": float(gb.mean()),
            "centred_gain_pearson": construct(ga, gb),
        }
    return out


def load_bank(folder: str | Path) -> list[Signature]:
    """Signatures of known-independent models: every loadable *.json under `folder`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SignatureError(
            f"compare.bank={folder}: not a folder (point it at a folder of "
            "signatures of known-independent models)"
        )
    sigs, bad = [], []
    for p in sorted(root.rglob("*.json")):
        try:
            sigs.append(load_signature(p))
        except SignatureError as e:
            bad.append(str(e))
    for msg in bad:
        log.warning("bank: skipped %s", msg)
    if len(sigs) < 3:
        raise SignatureError(
            f"compare.bank={folder}: {len(sigs)} usable signatures; an empirical null needs at "
            "least 3 known-independent models (fingerprint them with `npu-fp fingerprint`)"
        )
    return sigs


def bank_null(bank: list[Signature]) -> dict[str, list[float]]:
    """Every profile score over all pairs of bank models."""
    null: dict[str, list[float]] = {}
    for a, b in combinations(bank, 2):
        for k, v in profile_scores(a, b).items():
            if v is not None:
                null.setdefault(k, []).append(v)
    return null


def calibrate(scores: dict[str, float | None], null: dict[str, list[float]] | None) -> dict:
    """Per score: z and empirical p against the bank, or {"calibrated": False}."""
    if null is None:
        return {k: {"calibrated": False} for k in scores}
    out = {}
    for k, v in scores.items():
        xs = np.asarray(null.get(k, []), dtype=np.float64)
        if v is None or len(xs) < 3:
            out[k] = {"calibrated": False, "n_null": int(len(xs))}
            continue
        sd = float(xs.std(ddof=1))
        z = (v - float(xs.mean())) / sd if sd > 0 else None
        p = (1 + int((xs >= v).sum())) / (1 + len(xs))
        out[k] = {"calibrated": True, "z": z, "p_empirical": p, "n_null": int(len(xs))}
    return out
