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
from pathlib import Path

import numpy as np
import torch

from npu_fp import derive, realweights
from npu_fp.compare.align import identity
from npu_fp.compare.pairwork import FFN, Prep, layer_pair
from npu_fp.compare.tensors import ModelView
from npu_fp.compare.units import SALT, block_test, reduce_dims, to_units
from npu_fp.config import CompareConfig


@dataclass(frozen=True)
class NullRow:
    """One test on one real null pair."""

    model: str
    family: str  # unit_identity | matched_units(_analytic) | expert_units | matched_heads | inplace
    test: str  # e.g. "mlp", "attn", "expert 3", role name
    layer_a: int
    layer_b: int
    statistic: float  # z for z-tests, X - EX for identity tests, agreement fraction for margins
    log_p: float
    half: str  # "calibration" | "check"
    matchings: int = 0  # unit matchings compared (2: up/down, 3: gate/up/down); margins only

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "test": self.test,
            "layer_a": self.layer_a,
            "layer_b": self.layer_b,
            "statistic": round(self.statistic, 4),
            "log10_p": round(self.log_p / math.log(10), 4),
            "half": self.half,
            "matchings": self.matchings,
        }


def layer_pairs(
    num_layers: int, max_pairs: int, seed: int = 0, adjacent: bool = False
) -> list[tuple[int, int]]:
    """Distinct layer pairs (i < j), a seeded subset when there are more than `max_pairs`;
    with `adjacent`, every (l, l + 1) too: neighbours share the most features (hardest null)."""
    pairs = list(combinations(range(num_layers), 2))
    if len(pairs) > max_pairs:
        pick = np.sort(
            np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        )
        pairs = [pairs[i] for i in pick]
    if adjacent:
        pairs = sorted(set(pairs) | {(k, k + 1) for k in range(num_layers - 1)})
    return pairs


def measured_envelope(rows: list[NullRow]) -> dict[int, float]:
    """Largest agreement fraction per number of matchings on the calibration half (what
    compare/margins.py's MEASURED_MAX_FRACTION records)."""
    out: dict[int, float] = {}
    for r in rows:
        if r.family in ("matched_units", "expert_units") and r.half == "calibration":
            out[r.matchings] = max(out.get(r.matchings, 0.0), r.statistic)
    return out


def within_model_null(
    name: str,
    view: ModelView,
    hidden: int,
    cfg: CompareConfig,
    device: torch.device,
    pairs: list[tuple[int, int]],
) -> list[NullRow]:
    prep = Prep(identity(hidden), {}, [])
    rows: list[NullRow] = []
    for k, (la, lb) in enumerate(pairs):
        half = "calibration" if k % 2 == 0 else "check"
        r = layer_pair(view, view, la, lb, prep, cfg, device, diagonal=True)
        for t in r["identity"]:
            if "log_p" in t:
                rows.append(
                    NullRow(
                        name,
                        "unit_identity",
                        t["role"],
                        la,
                        lb,
                        t["x"] - t["mean"],
                        t["log_p"],
                        half,
                    )
                )
        for t in r["blocks"]:
            if "z" not in t:
                continue
            rows.append(
                NullRow(
                    name,
                    "matched_units",
                    t["block"],
                    la,
                    lb,
                    t["frac"],
                    t["margin_log_p"],
                    half,
                    len(t["roles"]),
                )
            )
            rows.append(
                NullRow(
                    name, "matched_units_analytic", t["block"], la, lb, t["z"], t["log_p"], half
                )
            )
        if r["heads"] is not None and "z" in r["heads"]:
            rows.append(
                NullRow(
                    name,
                    "matched_heads",
                    "heads",
                    la,
                    lb,
                    r["heads"]["z"],
                    r["heads"]["log_p"],
                    half,
                )
            )
        for t in r["inplace"]:
            rows.append(NullRow(name, "inplace", t["role"], la, lb, t["z"], t["log_p"], half))
        for t in pseudo_expert_tests(view, la, lb, prep, cfg, device):
            rows.append(
                NullRow(
                    name,
                    "expert_units",
                    t["block"],
                    la,
                    lb,
                    t["frac"],
                    t["margin_log_p"],
                    half,
                    len(t["roles"]),
                )
            )
    return rows


def pseudo_expert_tests(
    view: ModelView,
    la: int,
    lb: int,
    prep: Prep,
    cfg: CompareConfig,
    device: torch.device,
    experts: int = 8,
) -> list[dict]:
    """The expert -> parent test (`block_test` of one expert into a dense FFN pool) on a real
    null: layer `lb`'s FFN cut into `experts` contiguous slices of units, each matched into
    layer `la`'s FFN, as an upcycled MoE's experts are matched into the dense parent."""
    res = prep.residual
    assert res is not None
    blk_b, pool = {}, {}
    for short, role in FFN.items():
        ma, mb = view.read(la, role), view.read(lb, role)
        if ma is None or mb is None:
            continue
        pool[short] = reduce_dims(to_units(ma, role, res, "a", device), cfg.proj_dim, SALT[short])
        blk_b[short] = reduce_dims(to_units(mb, role, res, "b", device), cfg.proj_dim, SALT[short])
    if len(pool) < 2:
        return []
    n = next(iter(blk_b.values())).shape[0]
    size = n // experts
    out = []
    for e in range(experts):
        blk = {k: v[e * size : (e + 1) * size] for k, v in blk_b.items()}
        t = block_test(blk, pool, cfg.lap_max_units)
        if t is not None and "z" in t:
            out.append({"block": f"pseudo-expert {e}", **t})
    return out


def false_positives(rows: list[NullRow], family: str, level: float) -> tuple[int, int]:
    """(rows of `family` with p < level, rows of `family`)."""
    fam = [r for r in rows if r.family == family]
    return sum(1 for r in fam if r.log_p < math.log(level)), len(fam)


# --- the whole real-weight null set (benchmarks/real_weights.py and tests/test_real_weights.py) --

LEVELS = (0.05, 0.01, 1e-3, 1e-6)


def build_related(base: Path, out: Path) -> dict[str, Path]:
    """Real related copies of a real model: re-quantised, vocabulary-pruned and reordered,
    function-preserving permutation (FFN units, heads and hidden dimensions), continued
    training (noise plus low-rank drift)."""
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "requant_q8": lambda d: realweights.requantize(base, d, "Q8_0"),
        "vocab_pruned": lambda d: derive.vocab_reorder_truncate(base, d),
        "permuted": lambda d: derive.permute(base, d, hidden=True),
        "continued": lambda d: derive.continued_training(base, d),
    }
    paths = {}
    for name, fn in made.items():
        dst = out / f"{base.name}_{name}"
        if not (dst / "model.safetensors").exists():
            fn(dst)
        paths[name] = dst
    return paths


def family_rows(doc: dict, labels: dict[tuple[str, str], str]) -> list[dict]:
    """Per pair of a compare report: truth label, verdict, and each family's log10 p."""
    out = []
    for p in doc["pairs"]:
        truth = labels.get((p["a"], p["b"])) or labels.get((p["b"], p["a"])) or "unknown"
        fams = {e["kind"]: e.get("log10_p") for e in p["evidence"]}
        out.append(
            {
                "a": p["a"],
                "b": p["b"],
                "truth": truth,
                "verdict": p["verdict"],
                "log10_p": p["log10_p"],
                "families": fams,
                "decided_by": (p.get("decided_by") or {}).get("family"),
            }
        )
    return out


def null_summary(rows: list[NullRow], pair_rows: list[dict]) -> list[dict]:
    """Per family and half: null tests, smallest p seen, and false positives at each level."""
    table = []
    families = sorted({r.family for r in rows})
    for fam in families:
        for half in ("calibration", "check"):
            sel = [r for r in rows if r.family == fam and r.half == half]
            if not sel:
                continue
            table.append(
                {
                    "family": fam,
                    "kind": "within-model",
                    "half": half,
                    "tests": len(sel),
                    "max_statistic": round(max(r.statistic for r in sel), 3),
                    "min_log10_p": round(min(r.log_p for r in sel) / math.log(10), 3),
                    **{f"fp@{lv:g}": sum(r.log_p < math.log(lv) for r in sel) for lv in LEVELS},
                }
            )
    cross = [r for r in pair_rows if r["truth"] == "independent"]
    kinds = sorted({k for r in cross for k, v in r["families"].items() if v is not None})
    for fam in kinds:
        vals = [r["families"][fam] for r in cross if r["families"].get(fam) is not None]
        table.append(
            {
                "family": fam,
                "kind": "cross-model",
                "half": "all",
                "tests": len(vals),
                "max_statistic": None,
                "min_log10_p": round(min(vals), 3),
                **{f"fp@{lv:g}": sum(v < math.log10(lv) for v in vals) for lv in LEVELS},
            }
        )
    return table
