"""Bad input gives a clear error or an explicit `inconclusive` with the reason, never a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compare_fixtures import SHAPE, pair, run_compare, write_base
from conftest import REPO, run_cli

from npu_fp import derive, zoo
from npu_fp.compare.inputs import CompareInputError
from npu_fp.signature import dumps


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    base = write_base(root / "base")
    cont = derive.continued_training(base, root / "cont")
    notok = root / "cont-notok"
    shutil.copytree(cont, notok)
    (notok / "tokenizer.json").unlink()
    vocab = derive.vocab_reorder_truncate(base, root / "vocab")
    vocab_notok = root / "vocab-notok"
    shutil.copytree(vocab, vocab_notok)
    (vocab_notok / "tokenizer.json").unlink()
    shape = {**SHAPE, "hidden_size": 48, "intermediate_size": 96, "vocab_size": 200}
    t = {k: v for k, v in zoo.dense_tensors(shape, 7).items() if not k.endswith(".bias")}
    cfg = {**zoo.qwen2_config(shape), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    other = zoo.write_checkpoint(root / "llama48", t, cfg, torch.float32)
    return {
        "base": base,
        "cont": cont,
        "notok": notok,
        "vocab_notok": vocab_notok,
        "other": other,
        "root": root,
    }


@pytest.fixture(scope="module")
def sigs(models: dict[str, Path]) -> list[Path]:
    out = models["root"] / "sigs"
    run_compare([models["base"], models["cont"]], out, cache_dir=str(out / "cache"))
    return sorted((out / "cache").rglob("signature.json"))


def test_older_schema_and_corrupted_signatures(sigs: list[Path], tmp_path: Path) -> None:
    doc = json.loads(sigs[0].read_text())
    doc["schema_version"] = 0
    old = tmp_path / "old.json"
    old.write_text(dumps(doc))
    with pytest.raises(CompareInputError, match="schema 0"):
        run_compare([], tmp_path / "o1", signatures=[old, sigs[1]])
    bad = tmp_path / "bad.json"
    bad.write_text(sigs[0].read_text()[:-200])
    with pytest.raises(CompareInputError, match="corrupted"):
        run_compare([], tmp_path / "o2", signatures=[bad, sigs[1]])
    edited = json.loads(sigs[0].read_text())
    edited["identity"]["num_layers"] = 99
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(CompareInputError, match="does not match its sha256"):
        run_compare([], tmp_path / "o3", signatures=[tmp_path / "edited.json", sigs[1]])


def test_nothing_comparable_is_inconclusive(models: dict[str, Path], tmp_path: Path) -> None:
    doc = run_compare([models["base"], models["other"]], tmp_path)
    p = pair(doc, "base", "llama48")
    assert p["verdict"] == "inconclusive" and p["p_value"] is None
    assert "nothing comparable" in p["reason"] and "no vocabulary alignment" in p["reason"]


def test_self_comparison_is_inconclusive(models: dict[str, Path], tmp_path: Path) -> None:
    doc = run_compare([models["base"], models["base"]], tmp_path)
    p = doc["pairs"][0]
    assert (p["a"], p["b"]) == ("base", "base-2")
    assert p["verdict"] == "inconclusive" and "self-comparison" in p["reason"]


def test_missing_tokenizer_is_reported(models: dict[str, Path], tmp_path: Path) -> None:
    doc = run_compare([models["base"], models["notok"], models["vocab_notok"]], tmp_path)
    p = pair(doc, "base", "cont-notok")
    assert "no tokenizer" in p["alignment"]["note"] and "assumed" in p["alignment"]["note"]
    assert p["verdict"] == "related"
    q = pair(doc, "base", "vocab-notok")  # vocabulary sizes differ: no alignment, said so
    assert "no vocabulary alignment" in q["alignment"]["note"]
    assert q["verdict"] == "related"  # the layers still match in place


def test_signatures_without_weights(sigs: list[Path], tmp_path: Path) -> None:
    moved = []
    for i, s in enumerate(sigs):
        doc = json.loads(s.read_text())
        doc["identity"]["path"] = str(tmp_path / f"gone{i}")
        p = tmp_path / f"s{i}.json"
        p.write_text(dumps(doc))
        moved.append(p)
    doc = run_compare([], tmp_path / "out", signatures=moved)
    p = doc["pairs"][0]
    assert p["verdict"] == "inconclusive" and "weights unavailable" in p["reason"]
    assert p["honestagi_score"] is not None


def test_too_few_inputs_and_bad_names(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CompareInputError, match="at least two"):
        run_compare([models["base"]], tmp_path)
    with pytest.raises(CompareInputError, match="compare.names"):
        run_compare([models["base"], models["cont"]], tmp_path, names=["x"])
    with pytest.raises(CompareInputError, match="does not exist"):
        run_compare([models["base"], tmp_path / "nope"], tmp_path)
    with pytest.raises(ValueError, match="weak_p"):
        run_compare([models["base"], models["cont"]], tmp_path, weak_p=1e-9)
    with pytest.raises(ValueError, match="compare.bank"):
        run_compare([models["base"], models["cont"]], tmp_path, bank=str(tmp_path / "nobank"))


@pytest.mark.slow
def test_cli_reports_a_bad_signature(sigs: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "compare",
            f"compare.signatures=[{bad},{sigs[0]}]",
            f"hydra.run.dir={tmp_path / 'out'}",
            "device=cpu",
        ],
        cwd=REPO,
    )
    assert r.returncode == 2, r.stderr
    assert "npu-fp: error: unusable signature" in r.stderr and "Traceback" not in r.stderr
