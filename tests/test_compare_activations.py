"""Activation-norm profile scores: the seed construction on mean token norms (exact, interpolated),
missing activations, bank calibration, differing settings, the report and its figure, and verdicts
that activation scores never move."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from compare_fixtures import pair, run_compare, write_base
from scipy import stats

from npu_fp import derive
from npu_fp.compare.activation_profiles import (
    STREAMS,
    activation_bank,
    activation_profile,
    activation_scores,
)
from npu_fp.signature import Signature, dumps, load_signature, seal

SETTINGS = {
    "corpus": "embedded:test",
    "corpus_sha256": "ab" * 32,
    "batch_size": 1,
    "seq_len": 16,
    "num_batches": 2,
    "seed": 0,
    "dtype": "float32",
}


def rows(curves: dict[str, list[float]]) -> list[dict]:
    return [
        {
            "layer": i,
            "stream": s,
            "mean_norm": v,
            "std_norm": 0.1 * v,
            "tokens": 32,
            "nan": 0,
            "inf": 0,
        }
        for s, vals in curves.items()
        for i, v in enumerate(vals)
    ]


def with_norms(
    doc: dict, curves: dict[str, list[float]] | None, name: str | None = None, **settings: object
) -> dict:
    """A resealed copy of `doc` whose activations are `curves` (None: no activations)."""
    out = copy.deepcopy({k: v for k, v in doc.items() if k != "sha256"})
    out.pop("activations", None)
    if curves is not None:
        out["activations"] = {
            "rows": rows(curves),
            "routing": [],
            "settings": {**SETTINGS, **settings},
        }
    if name is not None:
        out["identity"]["name"] = name
    return seal(out)


def sig(curves: dict[str, list[float]] | None, name: str = "m", **settings: object) -> Signature:
    return Signature(with_norms({"identity": {"name": name, "num_layers": 4}}, curves, **settings))


def random_curves(rng: np.random.Generator, n: int) -> dict[str, list[float]]:
    return {s: list(rng.uniform(1, 10, n)) for s in STREAMS}


def seed_formula(
    a: dict[str, list[float]], b: dict[str, list[float]], corr=None, diff: bool = False
) -> float:
    """fingerprint-methods.md 1.2-1.3 written out: z-score, np.interp onto the deeper, correlate."""
    rs = []
    for s in STREAMS:
        za, zb = ((np.asarray(x) - np.mean(x)) / np.std(x) for x in (a[s], b[s]))
        n = max(len(za), len(zb))
        za, zb = (np.interp(np.linspace(0, len(z) - 1, n), np.arange(len(z)), z) for z in (za, zb))
        if diff:
            za, zb = np.diff(za), np.diff(zb)
        rs.append(corr(za, zb) if corr else np.corrcoef(za, zb)[0, 1])
    return float(np.mean(rs))


def test_seed_construction_exact_and_interpolated() -> None:
    rng = np.random.default_rng(0)
    a = random_curves(rng, 12)
    b = {s: list(np.asarray(v) * 3.0 + rng.normal(0, 0.5, 12)) for s, v in a.items()}
    c = random_curves(rng, 7)
    spearman = lambda x, y: stats.spearmanr(x, y)[0]  # noqa: E731
    for x, y in ((a, b), (a, c), (c, a)):
        got = activation_scores(sig(x), sig(y))
        assert got["activation_score"] == pytest.approx(seed_formula(x, y), abs=1e-12)
        assert got["activations"] == pytest.approx(got["activation_score"], abs=1e-12)
        assert got["activations_spearman"] == pytest.approx(seed_formula(x, y, spearman), abs=1e-12)
        assert got["activations_diff"] == pytest.approx(seed_formula(x, y, diff=True), abs=1e-12)
        for s in STREAMS:  # Pearson ignores the z-scoring: interpolate the raw norms
            r = float(np.corrcoef(*_resampled(x[s], y[s]))[0, 1])
            assert got[f"activation_{s}"] == pytest.approx(r, abs=1e-12)
    assert activation_scores(sig(a), sig(b))["activation_score"] > 0.9
    prof = activation_profile(sig(a), sig(c), ("a", "c"))
    assert prof["interpolated"] and prof["layers"] == {"a": 12, "b": 7}


def _resampled(x: list[float], y: list[float]) -> tuple[np.ndarray, ...]:
    n = max(len(x), len(y))
    return tuple(np.interp(np.linspace(0, len(v) - 1, n), np.arange(len(v)), v) for v in (x, y))


def test_missing_activations_are_unavailable_with_reason() -> None:
    rng = np.random.default_rng(1)
    have, lack = sig(random_curves(rng, 6), "with"), sig(None, "without")
    prof = activation_profile(have, lack, ("with", "without"))
    assert not prof["available"] and prof["scores"]["activation_score"] is None
    assert prof["reason"] == (
        "no activations in signature without: run fingerprint with activations.enabled=true"
    )
    assert prof["settings"]["a"]["seq_len"] == 16 and prof["settings"]["b"] is None
    both = activation_profile(lack, sig(None, "also"), ("without", "also"))
    assert "signatures without and also" in both["reason"]
    assert all(not c["calibrated"] for c in both["calibration"].values())
    short = activation_profile(have, sig({s: [1.0, 2.0] for s in STREAMS}), ("with", "short"))
    assert short["available"] and short["scores"]["activation_score"] is None
    assert "fewer than 3 layers" in short["reason"]


def test_bank_calibration_and_its_absence() -> None:
    rng = np.random.default_rng(2)
    bank_sigs = [sig(random_curves(rng, 10), f"b{i}") for i in range(6)] + [sig(None, "plain")]
    bank = activation_bank(bank_sigs)
    assert bank.models == 6 and bank.pairs == 15
    a = random_curves(rng, 10)
    b = {s: list(np.asarray(v) + rng.normal(0, 0.1, 10)) for s, v in a.items()}
    prof = activation_profile(sig(a), sig(b), ("a", "b"), bank)
    v = prof["scores"]["activation_score"]
    null = np.asarray(bank.null["activation_score"])
    cal = prof["calibration"]["activation_score"]
    assert cal["calibrated"] and cal["n_null"] == 15
    assert cal["z"] == pytest.approx((v - null.mean()) / null.std(ddof=1))
    assert cal["p_empirical"] == pytest.approx((1 + (null >= v).sum()) / 16)
    assert prof["bank_settings_match"] and prof["note"] is None
    none = activation_profile(sig(a), sig(b), ("a", "b"), None)
    assert none["calibration"]["activation_score"] == {"calibrated": False}
    assert none["calibration_note"].startswith("uncalibrated")
    plain = activation_profile(sig(a), sig(b), ("a", "b"), activation_bank([sig(None)] * 4))
    assert not plain["calibration"]["activation_score"]["calibrated"]
    assert "0 bank signature(s) carry activations" in plain["calibration_note"]
    other = activation_bank([sig(random_curves(rng, 10), seq_len=64) for _ in range(3)])
    flagged = activation_profile(sig(a), sig(b), ("a", "b"), other)
    assert flagged["bank_settings_match"] is False and "bank" in flagged["note"]


def test_differing_settings_are_flagged() -> None:
    rng = np.random.default_rng(3)
    a = random_curves(rng, 8)
    prof = activation_profile(sig(a), sig(a, seq_len=32, corpus_sha256="cd" * 32), ("a", "b"))
    assert prof["available"] and prof["scores"]["activation_score"] == pytest.approx(1.0)
    assert prof["settings"]["comparable"] is False
    assert prof["settings"]["differences"] == [
        f"corpus_sha256: {'ab' * 6} vs {'cd' * 6}",
        "seq_len: 16 vs 32",
    ]
    assert "not comparable" in prof["note"]
    same = activation_profile(sig(a), sig(a), ("a", "b"))
    assert same["settings"]["comparable"] is True and same["note"] is None


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real signatures with activations of a base, its continued training and an unrelated model."""
    from npu_fp.commands import fingerprint_into
    from npu_fp.config import ActivationsConfig, RunConfig
    from npu_fp.dist import distributed
    from npu_fp.report import activation_report, profile_plot

    root = tmp_path_factory.mktemp("act")
    base = write_base(root / "base", 0)
    models = {
        "base": base,
        "continued": derive.continued_training(base, root / "continued", 1),
        "other": write_base(root / "other", 7),
    }
    cfg = RunConfig(
        command="fingerprint",
        out_dir=str(root / "fp"),
        progress=False,
        device="cpu",
        activations=ActivationsConfig(enabled=True, batch_size=1, seq_len=16, num_batches=2),
    )
    out = {}
    with pytest.MonkeyPatch.context() as mp, distributed(cfg.device) as ctx:
        # the per-model figures are not under test here and cost most of the time
        mp.setattr(profile_plot, "plot_profiles", lambda sigs, path, stat="std": path)
        mp.setattr(activation_report, "write_activation_outputs", lambda result, out_dir: [])
        for name, m in models.items():
            s = fingerprint_into(ctx, cfg, str(m), root / "sigs" / name, name)
            assert s is not None and s.path is not None
            out[name] = Path(s.path)
    return out


def _rewrite(
    path: Path,
    out: Path,
    curves: dict | None | str = "keep",
    name: str | None = None,
    **settings: object,
) -> Path:
    doc = load_signature(path).doc
    if curves == "keep":
        new = seal(
            {
                **{k: v for k, v in doc.items() if k != "sha256"},
                "activations": {
                    **doc["activations"],
                    "settings": {**doc["activations"]["settings"], **settings},
                },
            }
        )
    else:  # the bank keeps the real settings, so its null describes the real pairs
        real = (doc.get("activations") or {}).get("settings", {})
        new = with_norms(doc, curves, name, **real)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(new))
    return out


def test_report_shows_scores_plot_and_unchanged_verdicts(
    fingerprints: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    bank = tmp_path / "bank"
    for i in range(4):
        _rewrite(fingerprints["other"], bank / f"b{i}.json", random_curves(rng, 4), f"bank{i}")
    other = _rewrite(fingerprints["other"], tmp_path / "in" / "other.json", None)
    sigs = [fingerprints["base"], fingerprints["continued"], other]
    out = tmp_path / "with"
    doc = run_compare([], out, signatures=sigs, bank=str(bank))
    rel = pair(doc, "base", "continued")
    act = rel["profiles"]["activation_norms"]
    a, b = (load_signature(fingerprints[n]) for n in ("base", "continued"))
    assert act["available"] and act["settings"]["comparable"]
    assert act["bank_settings_match"] and act["note"] is None
    assert rel["activation_score"] == pytest.approx(activation_scores(a, b)["activation_score"])
    assert act["calibration"]["activation_score"]["calibrated"]
    assert act["calibration"]["activation_score"]["n_null"] == 6
    assert doc["bank"]["activation_models"] == 4 and doc["bank"]["activation_pairs"] == 6
    assert doc["models"][0]["activations"]["seq_len"] == 16
    assert doc["models"][2]["activations"] is None
    miss = pair(doc, "base", "other")["profiles"]["activation_norms"]
    assert not miss["available"] and miss["reason"].startswith("no activations in signature other")
    assert (out / "activation_norms.png").stat().st_size > 0
    assert doc["figures"]["activation_norms"] == "activation_norms.png"
    md = (out / "report.md").read_text()
    assert "activation_norms.png" in md and "activation_score **" in md
    assert "unavailable: no activations in signature other" in md

    # the same pairs without any activations: identical verdicts and evidence, no figure
    bare = [_rewrite(s, tmp_path / "bare" / f"{i}.json", None) for i, s in enumerate(sigs)]
    out2 = tmp_path / "without"
    doc2 = run_compare([], out2, signatures=bare, bank=str(bank))
    keys = ("verdict", "p_value", "log10_p", "reason", "evidence", "honestagi_score")
    for p, q in zip(doc["pairs"], doc2["pairs"], strict=True):
        assert {k: p[k] for k in keys} == {k: q[k] for k in keys}
    assert rel["verdict"] == "related"
    assert not (out2 / "activation_norms.png").exists()
    assert "activation_norms" not in doc2["figures"]
    assert "no compared signature carries activations" in (out2 / "report.md").read_text()

    # settings that differ are flagged in the report
    longer = _rewrite(fingerprints["continued"], tmp_path / "seq" / "c.json", seq_len=32)
    doc3 = run_compare([], tmp_path / "seq_out", signatures=[fingerprints["base"], longer])
    pair3 = doc3["pairs"][0]
    flag = pair3["profiles"]["activation_norms"]
    # pairs are reported in a canonical order (content hash): the longer run may be either side
    names = [m["name"] for m in doc3["models"]]
    seq = {names[0]: 16, names[1]: 32}
    want = f"seq_len: {seq[pair3['a']]} vs {seq[pair3['b']]}"
    assert flag["settings"]["differences"] == [want]
    md3 = (tmp_path / "seq_out" / "report.md").read_text()
    assert want in md3 and "not comparable" in md3
