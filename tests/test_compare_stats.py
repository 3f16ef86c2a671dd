"""p-value arithmetic and the rank statistics' nulls."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from npu_fp.compare.stats import (
    agreement_z,
    cauchy_logp,
    fisher_logp,
    log_chi2_sf,
    log_norm_sf,
    spearman,
)
from npu_fp.compare.units import monotone_match


def test_fisher_matches_scipy_and_stays_finite_in_the_tail() -> None:
    ps = [0.01, 0.2, 0.5, 0.03]
    ref = stats.combine_pvalues(ps, method="fisher").pvalue
    assert fisher_logp([math.log(p) for p in ps]) == pytest.approx(math.log(ref), rel=1e-9)
    deep = fisher_logp([log_norm_sf(60.0)] * 10)
    assert math.isfinite(deep) and deep < -10000
    # the asymptotic branch continues the exact one
    assert log_chi2_sf(1200.0, 20) == pytest.approx(math.log(stats.chi2.sf(1200.0, 20)), rel=1e-6)
    assert log_chi2_sf(3000.0, 20) < log_chi2_sf(2000.0, 20)


def test_cauchy_combination() -> None:
    assert cauchy_logp([math.log(0.5)] * 3) == pytest.approx(math.log(0.5), rel=1e-9)
    # one overwhelming family wins whatever the others say (p = 1 included)
    lp = cauchy_logp([0.0, math.log(1e-40), math.log(0.7)])
    assert lp / math.log(10) == pytest.approx(-40 + math.log10(3), abs=0.01)
    assert cauchy_logp([]) == 0.0


def test_agreement_statistic_is_standard_normal_under_independence() -> None:
    rng = np.random.default_rng(0)
    n = 40
    zs = []
    for _ in range(2000):
        maps = [rng.permutation(n) for _ in range(3)]
        rhos = [spearman(maps[i], maps[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        zs.append(agreement_z(rhos, n))
    zs = np.asarray(zs)
    assert abs(zs.mean()) < 0.1 and abs(zs.std() - 1.0) < 0.08
    assert agreement_z([1.0, 1.0, 1.0], n) == pytest.approx(3 * math.sqrt(39 / 3))


def test_monotone_matching_finds_pruned_layers() -> None:
    z = np.random.default_rng(1).normal(size=(8, 4))
    for j, i in enumerate((0, 2, 4, 6)):
        z[i, j] = 30.0
    assert monotone_match(z) == [(0, 0), (2, 1), (4, 2), (6, 3)]
    assert monotone_match(z.T) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert monotone_match(np.zeros((3, 3))) == [(0, 0), (1, 1), (2, 2)]
