"""The same verdicts and p-values from 1 and 2 ranks (real torchrun, gloo, free port)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compare_fixtures import write_base
from conftest import REPO, run_cli

from npu_fp import derive


def _torchrun(nproc: int, models: list[Path], out: Path, cache: Path) -> dict:
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "npu_fp",
        "compare",
        "compare.models=[" + ",".join(str(m) for m in models) + "]",
        f"hydra.run.dir={out}",
        "device=cpu",
        "progress=false",
        f"compare.cache_dir={cache}",
    ]
    r = run_cli(args, cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_one_and_two_ranks_agree(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base")
    models = [
        base,
        derive.permute(base, tmp_path / "perm", hidden=True),
        derive.prune_layers(base, tmp_path / "pruned"),
        derive.moge_upcycle(base, tmp_path / "moge"),
        derive.independent_matched(base, tmp_path / "indep"),
    ]
    # the 2-rank run fingerprints (collectively), the 1-rank run reuses those signatures
    two = _torchrun(2, models, tmp_path / "two", tmp_path / "cache")
    one = _torchrun(1, models, tmp_path / "one", tmp_path / "cache")
    assert two["timing"]["world_size"] == 2 and one["timing"]["world_size"] == 1
    assert set(one["timing"]["phases_s"]) == {"align", "sketch", "layers"}

    def key(doc: dict) -> list:
        return [
            (
                p["a"],
                p["b"],
                p["verdict"],
                p["log10_p"],
                [(e["kind"], e["log10_p"]) for e in p["evidence"]],
            )
            for p in doc["pairs"]
        ]

    assert key(one) == key(two)
    # pairs are reported in a canonical order (content hash): look them up unordered
    verdicts = {frozenset((p["a"], p["b"])): p["verdict"] for p in one["pairs"]}
    assert verdicts[frozenset(("base", "moge"))] == "related"
    assert verdicts[frozenset(("base", "indep"))] == "independent"
