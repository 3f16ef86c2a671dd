"""Mergeable sufficient statistics and the finished per-tensor numbers.

A `Moments` holds count, mean and central moments M2..M4 (Pebay's pairwise update, stable for data
with a large mean, unlike raw power sums), min / max over finite values and NaN / Inf counts. Partials
are merged in a fixed order on rank 0, so the result does not depend on how many ranks made them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Column layout of the fixed-schema table that ranks reduce to rank 0
FIELDS = ("n", "mean", "m2", "m3", "m4", "min", "max", "nan", "inf", "h0", "h1", "h2", "h3")
NUM_FIELDS = len(FIELDS)


@dataclass(slots=True)
class Moments:
    n: float = 0.0  # finite elements
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nan: float = 0.0
    inf: float = 0.0

    def merge(self, b: Moments) -> Moments:
        """Combine with `b` in place (self first, b second) and return self."""
        self.nan += b.nan
        self.inf += b.inf
        if b.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = b.n, b.mean, b.m2, b.m3, b.m4
            self.min, self.max = b.min, b.max
            return self
        na, nb = self.n, b.n
        n = na + nb
        delta = b.mean - self.mean
        dn = delta / n
        dn2 = dn * dn
        t1 = delta * dn * na * nb
        m4 = (
            self.m4
            + b.m4
            + t1 * dn2 * (na * na - na * nb + nb * nb)
            + 6.0 * dn2 * (na * na * b.m2 + nb * nb * self.m2)
            + 4.0 * dn * (na * b.m3 - nb * self.m3)
        )
        m3 = self.m3 + b.m3 + t1 * dn * (na - nb) + 3.0 * dn * (na * b.m2 - nb * self.m2)
        self.m2 = self.m2 + b.m2 + t1
        self.m3, self.m4 = m3, m4
        self.mean = self.mean + nb * dn
        self.n = n
        self.min = min(self.min, b.min)
        self.max = max(self.max, b.max)
        return self

    def to_row(self) -> list[float]:
        return [
            self.n,
            self.mean,
            self.m2,
            self.m3,
            self.m4,
            self.min,
            self.max,
            self.nan,
            self.inf,
        ]

    @classmethod
    def from_row(cls, row: list[float] | tuple[float, ...]) -> Moments:
        return cls(*[float(v) for v in row[:9]])


def finish(m: Moments) -> dict[str, float | int | None]:
    """Per-tensor numbers from merged moments. std uses ddof=1, as torch.std does."""
    n = int(m.n)
    numel = n + int(m.nan) + int(m.inf)
    if n == 0:
        return {
            "numel": numel,
            "finite": 0,
            "nan": int(m.nan),
            "inf": int(m.inf),
            "mean": None,
            "std": None,
            "rms": None,
            "l2": None,
            "min": None,
            "max": None,
            "absmax": None,
            "skew": None,
            "kurtosis": None,
        }
    var = m.m2 / (n - 1) if n > 1 else 0.0
    mean_sq = m.m2 / n + m.mean * m.mean
    return {
        "numel": numel,
        "finite": n,
        "nan": int(m.nan),
        "inf": int(m.inf),
        "mean": m.mean,
        "std": math.sqrt(var),
        "rms": math.sqrt(mean_sq),
        "l2": math.sqrt(m.m2 + n * m.mean * m.mean),
        "min": m.min,
        "max": m.max,  # the signed maximum (the QKV-bias counter-analysis uses exactly this)
        "absmax": max(abs(m.min), abs(m.max)),
        # population skewness and excess kurtosis (0 for a Gaussian); None for constant tensors
        "skew": math.sqrt(n) * m.m3 / m.m2**1.5 if m.m2 > 0 else None,
        "kurtosis": n * m.m4 / (m.m2 * m.m2) - 3.0 if m.m2 > 0 else None,
    }
