"""Empirical margins for the tests that fit a unit matching (matched units, expert units).

A unit matching is fitted on weights in residual coordinates, and trained models share
features there: two layers of one real model (same residual stream) agree on up to 13 % of their
FFN units when matched separately by up rows and down columns (multilingual-e5-small, layers 3
and 4), and the analytic Spearman null of that agreement (variance 1 / (n - 1)) gives p = 3e-10.
Worse, the Spearman z of a fixed agreement *fraction* grows like sqrt(n): the same 13 % at
Qwen2.5-14B width (13,824 units) would read as z = 18. So the decisive p-value of these tests is
not the analytic one. It is a margin over the real-null envelope, stated on the fraction:

    p = P(Binomial(n, q0) >= agreeing units),   q0 = ENVELOPE_FACTOR x the largest agreement
    fraction seen on the calibration half of the real within-model null (per number of matchings),

combined over blocks and layers with the Cauchy combination (valid under any dependence). A
derivative keeps its units (agreement 90-100 %), far above any envelope; convergent features of
independent training stay below it. The fraction scales with tokens and dims as the issue asks;
the binomial is a model, not an exact law, which is why the envelope carries a factor of 2 and why
README states this family as "empirical". `benchmarks/real_weights.py` re-measures the envelope
and prints it beside these constants; the check half of the null must stay clean (tests).
"""

from __future__ import annotations

import math

from scipy import stats

ENVELOPE_FACTOR = 2.0
# Largest agreement fraction on the calibration half of the real within-model null
# (benchmarks/real_weights.py, 2026-12-02: all-MiniLM-L6-v2, multilingual-e5-small, SmolLM2-135M,
# gemma-3-270m; adjacent layer pairs plus 12 seeded pairs per model, even pair index).
MEASURED_MAX_FRACTION = {2: 0.2188, 3: 0.0208}  # incl. pseudo-experts of 192 units
FLOOR = 0.01  # never assume an agreement rate below 1 % per unit, however clean the null looked


def envelope(matchings: int) -> float:
    """Per-unit agreement rate assumed under the null for `matchings` separate matchings."""
    measured = MEASURED_MAX_FRACTION.get(matchings, max(MEASURED_MAX_FRACTION.values()))
    return min(0.5, max(FLOOR, ENVELOPE_FACTOR * measured))


def margin_logp(agree: int, n: int, matchings: int) -> float:
    """log P(Binomial(n, q0) >= agree): 0 when the agreement is within the envelope."""
    if n <= 0 or agree <= 0:
        return 0.0
    q0 = envelope(matchings)
    if agree <= q0 * n:
        return 0.0
    lp = float(stats.binom.logsf(agree - 1, n, q0))
    if not math.isfinite(lp):  # beyond float range: Chernoff bound n * KL(agree / n || q0)
        f = agree / n
        kl = (
            f * math.log(f / q0) + (1 - f) * math.log((1 - f) / (1 - q0))
            if f < 1
            else math.log(1 / q0)
        )
        lp = -n * kl
    return min(0.0, lp)
