"""`npu-fp benchmark`: labelled pairs in, ROC AUC / TPR at 1 % FPR / false positives out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compare_fixtures import write_base

from npu_fp import derive
from npu_fp.config import BenchmarkConfig, RunConfig
from npu_fp.lineage_bench import ManifestError, load_manifest, roc_auc, tpr_at_fpr


def test_roc_auc_and_tpr_at_fpr() -> None:
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0], [1.0]) == 0.5
    assert roc_auc([], [1.0]) is None
    neg = [float(i) for i in range(100)]  # at FPR 1 % one negative may score above the cut
    assert tpr_at_fpr([98.5, 99.5, 50.0], neg) == pytest.approx(2 / 3)  # cut: 2nd-highest, 98


@pytest.mark.parametrize(
    "doc, why",
    [
        ({"models": {}}, "expected an object"),
        ({"models": {"x": {}}, "pairs": []}, "expected {'path'"),
        (
            {
                "models": {"x": {"path": "/nonexistent"}},
                "pairs": [{"a": "x", "b": "x", "label": "related"}],
            },
            "pair 0",
        ),
        (
            {
                "models": {"x": {"path": "/a"}, "y": {"path": "/b"}},
                "pairs": [{"a": "x", "b": "y", "label": "maybe"}],
            },
            "pair 0",
        ),
    ],
)
def test_bad_manifests_are_named(tmp_path: Path, doc: dict, why: str) -> None:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=why.replace("{", r"\{")):
        load_manifest(p, None)


@pytest.mark.slow
def test_benchmark_on_a_labelled_zoo(tmp_path: Path) -> None:
    from npu_fp.commands import benchmark

    base = write_base(tmp_path / "base", 31)
    other = write_base(tmp_path / "other", 32)
    cont = derive.continued_training(base, tmp_path / "cont", 33)
    manifest = {
        "source": "test zoo",
        "models": {
            "base": {"path": str(base)},
            "other": {"path": str(other)},
            "cont": {"path": str(cont)},
            "gone": {"hf": "org/absent"},
        },
        "pairs": [
            {"a": "base", "b": "cont", "label": "related"},
            {"a": "base", "b": "other", "label": "independent"},
            {"a": "cont", "b": "other", "label": "independent"},
            {"a": "base", "b": "gone", "label": "related"},
        ],
    }
    mf = tmp_path / "manifest.json"
    mf.write_text(json.dumps(manifest))
    cfg = RunConfig(
        command="benchmark",
        out_dir=str(tmp_path / "out"),
        device="cpu",
        progress=False,
        benchmark=BenchmarkConfig(pairs=str(mf), models_dir=str(tmp_path / "hf")),
    )
    result = json.loads(benchmark(cfg).read_text())
    assert result["overall"]["roc_auc"] == 1.0 and result["overall"]["related"] == 1
    assert result["overall"]["independent"] == 2 and result["false_positives"] == []
    assert result["verdicts"]["related"]["related"] == 1
    assert len(result["skipped"]) == 1 and "not found" in result["skipped"][0]["why"]
    assert "unit_identity" in result["families"]
    assert (tmp_path / "out" / "benchmark.md").read_text().startswith("# Lineage benchmark")


@pytest.mark.parametrize(
    "name, related, independent",
    [
        ("awm.json", 60, 90),
        ("cisco_model_provenance_kit.json", 55, 56),
        ("zhu_independence_tests_llama7b.json", 69, 141),
        ("leafbench.json", 104, 650),
    ],
)
def test_shipped_manifests_parse(name: str, related: int, independent: int) -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "manifests" / name
    m = load_manifest(path, None)
    labels = [p.label for p in m.pairs]
    assert (labels.count("related"), labels.count("independent")) == (related, independent)
    assert all(folder is None for folder in m.models.values())  # ids only: no weights shipped
