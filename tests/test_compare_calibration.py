"""Calibration: over >= 50 independent pairs the false-positive rate at the default threshold is
<= 1% and the p-values are valid (no more small p-values than uniform: the exact identity tests
use a conservative bound, so their p-values pile up near 1). Also: a bank of independent signatures calibrates the
profile scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compare_fixtures import SHAPE, build_independents, family, run_compare, write_base
from scipy import stats

from npu_fp import derive


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("panel")
    models = build_independents(root, 9, seed=100)
    models.append(derive.independent_matched(write_base(root / "b300", 300), root / "matched", 301))
    models.append(derive.moge_upcycle(write_base(root / "b400", 400), root / "moge400", 401))
    models.append(derive.mixtral_upcycle(write_base(root / "b500", 500), root / "mixtral500", 501))
    out = root / "out"
    return run_compare(models, out, cache_dir=str(out / "cache")), out


def test_false_positive_rate_and_uniform_p_values(panel: tuple[dict, Path]) -> None:
    doc = panel[0]
    pairs = doc["pairs"]
    assert len(pairs) >= 50
    fpr = sum(p["verdict"] == "related" for p in pairs) / len(pairs)
    assert fpr <= 0.01
    assert all(p["verdict"] in ("independent", "inconclusive") for p in pairs)
    assert sum(p["verdict"] == "independent" for p in pairs) >= 0.95 * len(pairs)
    combined = np.array([p["p_value"] for p in pairs])
    # one-sided: the empirical CDF must not lie above the uniform one (anti-conservative)
    assert stats.kstest(combined, "uniform", alternative="greater").pvalue > 1e-3
    for kind in ("unit_identity", "residual_identity", "matched_units"):
        ps = np.array([f["p_value"] for p in pairs if (f := family(p, kind))])
        assert len(ps) >= 30, kind
        assert stats.kstest(ps, "uniform", alternative="greater").pvalue > 1e-3, kind
    # the analytic Spearman p (reported, no longer decisive) is uniform on synthetic nulls
    ps = np.array([10 ** f["analytic_log10_p"] for p in pairs if (f := family(p, "matched_units"))])
    assert stats.kstest(ps, "uniform").pvalue > 1e-3


def test_bank_calibrates_profile_scores(panel: tuple[dict, Path], tmp_path: Path) -> None:
    cache = panel[1] / "cache"
    sigs = sorted(cache.rglob("signature.json"))
    doc = run_compare([], tmp_path, signatures=sigs[:2], bank=str(cache))
    cal = doc["pairs"][0]["profiles"]["calibration"]["honestagi_score"]
    assert cal["calibrated"] and cal["n_null"] == len(sigs) * (len(sigs) - 1) // 2
    assert (
        0 < cal["p_empirical"] <= 1 and "bank pairs" in doc["pairs"][0]["evidence"][-1]["summary"]
    )


def test_shape_of_panel() -> None:
    assert SHAPE["hidden_size"] == 64 and torch.get_default_dtype() == torch.float32
