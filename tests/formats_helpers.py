"""Shared by the format tests: `.bin` copies, in-process fingerprints, per-tensor comparisons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import run_cli
from safetensors.torch import load_file

from npu_fp.commands import fingerprint
from npu_fp.config import ModelConfig, PlanConfig, RunConfig, StatsConfig
from npu_fp.signature import load_signature

# every statistic of a tensors.csv row (the signature's tensor rows), plus the content hash
STAT_KEYS = (
    "dtype",
    "numel",
    "shape",
    "role",
    "layer",
    "mean",
    "std",
    "rms",
    "absmax",
    "max",
    "min",
    "l2",
    "kurtosis",
    "skew",
    "nan",
    "inf",
    "hash",
)


def fingerprint_rows(model: Path, out: Path, small: bool = True) -> dict[str, dict]:
    """`npu-fp fingerprint` on one process; `small` windows make reads cross every boundary."""
    sizes = (
        {
            "plan": PlanConfig(segment_bytes=4096),
            "stats": StatsConfig(chunk_elems=1000, read_bytes=4096),
        }
        if small
        else {}
    )
    cfg = RunConfig(
        model=ModelConfig(path=str(model)), out_dir=str(out), progress=False, device="cpu", **sizes
    )  # type: ignore[arg-type]
    [sig_path] = fingerprint(cfg)
    return {row["name"]: row for row in load_signature(sig_path).tensors}


def assert_same_stats(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for name, row in a.items():
        for key in STAT_KEYS:
            assert row.get(key) == b[name].get(key), (name, key, row.get(key), b[name].get(key))


def as_bin(src: Path, dst: Path, shards: int = 1, **save_kw: object) -> Path:
    """The safetensors model in `src` saved with torch.save, in `shards` files plus an index."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    if shards == 1:
        torch.save(sd, dst / "pytorch_model.bin", **save_kw)
        return dst
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, dst / fname)
        weight_map |= dict.fromkeys(part, fname)
    (dst / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return dst


def assert_fingerprint_cli_refuses(
    model: Path, out: Path, words: tuple[str, ...], cwd: Path
) -> None:
    """`npu-fp fingerprint` of a bad model: exit 2, a named error holding every one of `words`, no
    traceback, and no signature or table left in the run directory."""
    args = ["-m", "npu_fp", "fingerprint", f"model.path={model}", f"hydra.run.dir={out}"]
    r = run_cli([*args, "device=cpu", "progress=false"], cwd=cwd, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "npu-fp: error:" in r.stderr and "Traceback" not in r.stderr
    assert all(w in r.stderr for w in words), r.stderr[-2000:]
    assert not (out / "signature.json").exists() and not (out / "tensors.csv").exists()
