"""Real-weight null pairs: every weight-level test run where the truth is known to be "unrelated".

Two kinds of real null pairs (README, "Why you can trust a verdict"):
- *cross-model*: checkpoints trained independently by different organisations (the real models in
  `realweights.py`), compared by the full `compare` job;
- *within-model*: same-role matrices of two different layers of one real model. They were
  initialised independently and trained together, on the same data, in the same residual
  coordinates: for every test of a layer's own units (FFN units, heads) this is a harder null than
  two unrelated models, because nothing but the unit order separates them.

`within_model_null` runs the per-layer tests of `compare/pairwork.py` on such pairs (the same code
the job runs) and returns one row per test with its statistic and log p-value; `false_positives`
counts the rows below a level. Calibration and check halves are split by pair index parity, so a
margin fitted on one half is judged on pairs it never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from npu_fp.compare.align import identity
from npu_fp.compare.pairwork import Prep, layer_pair
from npu_fp.compare.tensors import ModelView
from npu_fp.config import CompareConfig


@dataclass(frozen=True)
class NullRow:
    """One test on one real null pair."""

    model: str
    family: str  # "unit_identity" | "matched_units" | "matched_heads" | "inplace"
    test: str  # e.g. "mlp", "attn", "expert 3", role name
    layer_a: int
    layer_b: int
    statistic: float  # z for z-tests, X - EX for identity tests
    log_p: float
    half: str  # "calibration" | "check"

    def to_json(self) -> dict:
        return {"model": self.model, "family": self.family, "test": self.test,
                "layer_a": self.layer_a, "layer_b": self.layer_b,
                "statistic": round(self.statistic, 4), "log10_p": round(self.log_p / math.log(10), 4),
                "half": self.half}


def layer_pairs(num_layers: int, max_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Distinct layer pairs (i < j), a seeded subset when there are more than `max_pairs`."""
    pairs = list(combinations(range(num_layers), 2))
    if len(pairs) <= max_pairs:
        return pairs
    pick = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False))
    return [pairs[i] for i in pick]


def within_model_null(name: str, view: ModelView, hidden: int, cfg: CompareConfig,
                      device: torch.device, pairs: list[tuple[int, int]]) -> list[NullRow]:
    prep = Prep(identity(hidden), {}, [])
    rows: list[NullRow] = []
    for k, (la, lb) in enumerate(pairs):
        half = "calibration" if k % 2 == 0 else "check"
        r = layer_pair(view, view, la, lb, prep, cfg, device, diagonal=True)
        for t in r["identity"]:
            if "log_p" in t:
                rows.append(NullRow(name, "unit_identity", t["role"], la, lb,
                                    t["x"] - t["mean"], t["log_p"], half))
        for t in r["blocks"]:
            if "z" not in t:
                continue
            rows.append(NullRow(name, "matched_units", t["block"], la, lb, t["z"], t["log_p"],
                                half))
        if r["heads"] is not None and "z" in r["heads"]:
            rows.append(NullRow(name, "matched_heads", "heads", la, lb, r["heads"]["z"],
                                r["heads"]["log_p"], half))
        for t in r["inplace"]:
            rows.append(NullRow(name, "inplace", t["role"], la, lb, t["z"], t["log_p"], half))
    return rows


def false_positives(rows: list[NullRow], family: str, level: float) -> tuple[int, int]:
    """(rows of `family` with p < level, rows of `family`)."""
    fam = [r for r in rows if r.family == family]
    return sum(1 for r in fam if r.log_p < math.log(level)), len(fam)
