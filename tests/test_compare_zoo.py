"""Every derivative of a seeded base is `related` with p < 1e-6; the std-matched independent is not.

One compare run over the whole zoo (base, seven derivatives, one independent model) backs every
test in this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from compare_fixtures import DERIVATIVES, build_zoo, family, pair, run_compare

from npu_fp.io import reader


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def report(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    doc = run_compare(list(zoo.values()), out, cache_dir=str(out / "cache"))
    return doc, out


@pytest.mark.parametrize("name", DERIVATIVES)
def test_derivative_is_related(report: tuple[dict, Path], name: str) -> None:
    p = pair(report[0], "base", name)
    assert p["verdict"] == "related", p["reason"]
    assert p["p_value"] < 1e-6 and p["log10_p"] < -6


def test_every_pair_of_derivatives_is_related(report: tuple[dict, Path]) -> None:
    for p in report[0]["pairs"]:
        if "independent" not in (p["a"], p["b"]):
            assert p["verdict"] == "related", (p["a"], p["b"], p["reason"])


def test_permutations_are_seen_through(report: tuple[dict, Path]) -> None:
    p = pair(report[0], "base", "permuted")
    units = family(p, "matched_units")
    assert units is not None and units["log10_p"] < -6
    assert "permuted" in p["alignment"]["map"]  # the hidden dimension was permuted too
    aligned = family(p, "aligned_weights")
    assert aligned is not None and aligned["log10_p"] < -6


def test_pruned_layers_are_matched_monotonically(report: tuple[dict, Path]) -> None:
    p = pair(report[0], "base", "pruned")
    lm = p["layer_matching"]
    # pairs are reported in a canonical order (content hash), so `base` may be either side
    base_first = p["a"] == "base"
    path = [[0, 0], [2, 1]] if base_first else [[0, 0], [1, 2]]
    assert lm["path"] == path and lm["tested"] == "monotone matching"
    assert family(p, "layer_matching")["log10_p"] < -6
    assert (len(lm["z"]), len(lm["z"][0])) == ((4, 2) if base_first else (2, 4))
    assert p["verdict"] == "related" and family(p, "unit_identity")["log10_p"] < -6


def test_vocabulary_change_is_aligned_by_token_strings(report: tuple[dict, Path]) -> None:
    p = pair(report[0], "base", "vocab")
    assert "shared by string" in p["alignment"]["note"]
    assert p["alignment"]["shared_tokens"] == 192 and p["alignment"]["log_p"] < math.log(1e-6)


@pytest.mark.parametrize("name,experts,groups", [("mixtral", 4, 0), ("moge", 16, 8)])
def test_upcycling_maps_experts_to_parent_units(
    report: tuple[dict, Path], name: str, experts: int, groups: int
) -> None:
    for a, b in (("base", name), ("continued", name)):
        p = pair(report[0], a, b)
        fam = family(p, "expert_units")
        moe_side = "b" if p["b"] == name else "a"
        assert fam is not None and fam["log10_p"] < -6
        assert fam["direction"] == ("b->a" if moe_side == "b" else "a->b")
        routed = [e for e in fam["experts"] if e["expert"] is not None]
        assert len(routed) == experts
        assert all(e["frac"] > 0.9 and e["log10_p"] < -6 for e in routed)
        assert len(fam["groups"]) == groups
        assert p["expert_map"]["rows"]


def test_moe_versus_moe_is_related_both_ways(report: tuple[dict, Path]) -> None:
    p = pair(report[0], "mixtral", "moge")
    assert p["verdict"] == "related"
    assert family(p, "expert_units")["log10_p"] < -6


def test_bf16_copy_is_related_without_identical_bytes(report: tuple[dict, Path]) -> None:
    p = pair(report[0], "base", "bf16")
    ident = family(p, "identical_bytes")
    assert ident is None or not ident.get("tensors")
    assert family(p, "aligned_weights")["log10_p"] < -6


def test_std_matched_independent_model_is_not_related(report: tuple[dict, Path]) -> None:
    for other in ("base", *DERIVATIVES):
        p = pair(report[0], other, "independent")
        if other not in ("pruned",):
            assert p["honestagi_score"] > 0.95, other  # the seed score is fooled ...
        assert p["verdict"] == "independent", (other, p["reason"])  # ... the weights are not
        assert p["p_value"] > 1e-3


def test_report_files(report: tuple[dict, Path]) -> None:
    doc, out = report
    assert {"models", "pairs", "p_threshold", "rule"} <= set(doc)
    assert {m["name"] for m in doc["models"]} == {"base", *DERIVATIVES, "independent"}
    m = doc["models"][0]
    assert {"name", "path", "arch", "num_layers"} <= set(m)
    p = doc["pairs"][0]
    assert {"a", "b", "verdict", "p_value", "honestagi_score", "evidence"} <= set(p)
    tiers = [e["tier"] for e in p["evidence"]]
    assert tiers == sorted(tiers) and tiers[-1] == 3  # profiles last, never decisive
    for f in ("report.md", "profiles_normalized.png", "bias_max.png", "verdicts.png"):
        assert (out / f).stat().st_size > 0, f
    related = [q for q in doc["pairs"] if q["verdict"] == "related"]
    assert len(doc["figures"]["layers"]) == len(related)
    assert any("moge" in k.split("|") for k in doc["figures"]["experts"])
    md = (out / "report.md").read_text()
    assert "1e-06" in md and "uncalibrated" in md
    json.loads((out / "report.json").read_text())  # strict JSON (no NaN)


def test_second_run_reuses_cached_signatures(
    zoo: dict[str, Path], report: tuple[dict, Path], tmp_path: Path
) -> None:
    cache = report[1] / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("signature.json")}
    doc = run_compare([zoo["base"], zoo["continued"]], tmp_path, cache_dir=str(cache))
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("signature.json")}
    assert before == after
    assert pair(doc, "base", "continued")["verdict"] == "related"


def test_comparison_streams_tensors_not_models(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npu_fp.compare.pairwork import layer_pair, prepare
    from npu_fp.compare.tensors import open_view
    from npu_fp.config import CompareConfig

    sizes: list[int] = []
    orig = reader.RowReader.read

    def spy(self: reader.RowReader, ref, r0: int, r1: int):  # noqa: ANN001
        sizes.append((r1 - r0) * (ref.nbytes // max(ref.rows, 1)))
        return orig(self, ref, r0, r1)

    monkeypatch.setattr(reader.RowReader, "read", spy)
    a, b = open_view(str(zoo["base"])), open_view(str(zoo["moge"]))
    cc = CompareConfig()
    import torch

    prep = prepare(a, b, cc, torch.device("cpu"))
    layer_pair(a, b, 1, 1, prep, cc, torch.device("cpu"), True)
    largest = max(r.nbytes for v in (a, b) for r in v.source.tensors.values())
    a.close()
    b.close()
    assert sizes and max(sizes) <= largest < a.source.total_bytes / 4
