"""p-value arithmetic in log space, so overwhelming evidence (p far below 1e-300) stays exact.

Every test reports a natural-log p-value. Within one evidence family, layers are independent under
the null of independent initialisation and are combined with Fisher's method; tests inside one
layer may be copies of each other (upcycled experts), so they are combined with the Cauchy
combination, valid under any dependence. Families share tensors: the smallest family p-value is
Sidak-corrected, exact for independent families and Bonferroni-like (valid under any dependence)
in the tail."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

LOG_P_FLOOR = -1e6  # log p below this is reported as the floor (identical bytes: "p = 0")


def log_norm_sf(z: float) -> float:
    """log P(Z >= z) for a standard normal, accurate far in the tail."""
    if not math.isfinite(z):
        return 0.0 if z < 0 else LOG_P_FLOOR
    return float(stats.norm.logsf(z))


def log_chi2_sf(x: float, dof: int) -> float:
    """log P(X >= x) for X ~ chi2(dof) with even dof (Fisher's statistic), exact in the tail."""
    k = dof / 2.0
    y = x / 2.0
    q = float(special.gammaincc(k, y))
    if q > 1e-280:
        return math.log(q)
    # Q(k, y) ~ y^(k-1) e^-y / Gamma(k) * sum_j (k-1)...(k-j) / y^j   (asymptotic, y >> k)
    term, total = 1.0, 1.0
    for j in range(1, 40):
        term *= (k - j) / y
        total += term
        if abs(term) < 1e-16:
            break
    return (k - 1.0) * math.log(y) - y - math.lgamma(k) + math.log(max(total, 1e-300))


def fisher_logp(log_ps: Sequence[float]) -> float:
    """Fisher's method, p = chi2.sf(-2 sum log p_i, 2n), in log space (0.0 for no tests)."""
    lps = [max(float(lp), LOG_P_FLOOR) for lp in log_ps]
    if not lps:
        return 0.0
    if len(lps) == 1:
        return lps[0]
    return max(log_chi2_sf(-2.0 * sum(lps), 2 * len(lps)), LOG_P_FLOOR)


def cauchy_logp(log_ps: Sequence[float]) -> float:
    """Cauchy combination (Liu & Xie 2020), equal weights: exactly uniform for independent
    p-values, asymptotically valid under any dependence, and equal to p for identical inputs."""
    if not log_ps:
        return 0.0
    if len(log_ps) == 1:
        return max(min(float(log_ps[0]), 0.0), LOG_P_FLOOR)
    cap = math.log1p(-1e-9)  # p = 1 would map to tan(-pi/2) = -inf
    lps = [max(min(float(lp), cap), LOG_P_FLOOR) for lp in log_ps]
    w = 1.0 / len(lps)
    if min(lps) > math.log(1e-12):
        t = sum(w * math.tan((0.5 - math.exp(lp)) * math.pi) for lp in lps)
        return math.log(min(max(0.5 - math.atan(t) / math.pi, 1e-300), 1.0))
    # far tail: tan((0.5 - p) pi) ~ 1 / (p pi), so p_comb ~ 1 / (pi T), T kept in log space
    pos = [math.log(w / math.pi) - lp for lp in lps if lp < math.log(1e-12)]
    rest = sum(w * math.tan((0.5 - math.exp(lp)) * math.pi) for lp in lps if lp >= math.log(1e-12))
    log_t = float(special.logsumexp(pos))
    if rest:
        log_t += math.log1p(max(rest * math.exp(-log_t), -0.5))
    return max(-math.log(math.pi) - log_t, LOG_P_FLOOR)


def sidak_logp(log_p_min: float, k: int) -> float:
    """1 - (1 - p_min)^k: the smallest of k p-values, corrected. Exact for independent tests,
    Bonferroni (valid under any dependence) in the tail."""
    if k <= 1:
        return min(log_p_min, 0.0)
    p = math.exp(log_p_min)
    if p < 1e-12:
        return max(math.log(k) + log_p_min, LOG_P_FLOOR)
    return math.log(-math.expm1(k * math.log1p(-min(p, 1.0 - 1e-16))))


def layered_logp(tests: Sequence[tuple[object, float]]) -> float:
    """(group, log p) tests: Cauchy within a group (one layer: its tests may be copies of each
    other, e.g. upcycled experts), Fisher across groups (layers are independent under the null)."""
    groups: dict[object, list[float]] = {}
    for key, lp in tests:
        groups.setdefault(key, []).append(lp)
    return fisher_logp(
        [cauchy_logp(v) for _, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    )


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    if len(x) < 3:
        return None
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return None if den == 0 else float((rx * ry).sum() / den)


def agreement_z(rhos: Sequence[float], n: int) -> float:
    """z of a sum of Spearman rhos between independent matchings of n units.

    Under the null each rho has mean 0 and variance exactly 1/(n-1) (permutation distribution of
    a rank correlation), and rhos that share one matching are uncorrelated, so the sum of k of
    them has variance k/(n-1).
    """
    if not rhos or n < 3:
        return 0.0
    return float(sum(rhos) * math.sqrt((n - 1) / len(rhos)))


def log10p(log_p: float) -> float:
    return log_p / math.log(10.0)


def p_value(log_p: float) -> float:
    """The p-value as a float (0.0 where it underflows; log10_p keeps the magnitude)."""
    return math.exp(log_p) if log_p > -745.0 else 0.0
