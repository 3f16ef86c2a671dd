"""Rank 0: test results and signatures -> the report document (verdicts, evidence, plots' data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from npu_fp.compare.activation_profiles import activation_bank, activation_profile, settings_of
from npu_fp.compare.inputs import Entry
from npu_fp.compare.profiles import bank_null, calibrate, profile_scores, raw_scales
from npu_fp.compare.verdict import (
    RULE,
    decide,
    families,
    identical_bytes,
    profile_evidence,
    rank_evidence,
)
from npu_fp.config import RunConfig
from npu_fp.signature import Signature, load_signature

FORMAT = "npu_fp.compare_report"
VERSION = 1


def _model_row(e: Entry, sig: Signature) -> dict:
    ident = sig.identity
    return {
        "name": e.name,
        "path": ident.get("path"),
        "arch": ident.get("architecture"),
        "adapter": ident.get("adapter"),
        "num_layers": ident.get("num_layers"),
        "num_experts": ident.get("num_experts"),
        "content_hash": ident.get("content_hash"),
        "signature": e.signature_path,
        "weights": e.weights_note,
        "activations": settings_of(sig),
    }


def _hash_view(sig: Signature) -> dict:
    return {"segment_bytes": sig.doc.get("settings", {}).get("segment_bytes"), "rows": sig.tensors}


def _no_test_reason(a: Entry, b: Entry, prep) -> str:
    missing = [x.weights_note for x in (a, b) if not x.weights]
    if missing:
        return "weights unavailable: " + "; ".join(missing)
    if prep is None:
        return "no weight-level test applies"
    if prep.residual is None:
        return (
            "nothing comparable: "
            + str(prep.align.get("note", ""))
            + "; "
            + str(prep.align.get("map", "hidden sizes differ"))
        )
    return "no comparable tensors (no shared roles with matching shapes)"


def _expert_map(fams: list[dict], layers: list[dict]) -> dict | None:
    blocks = [b for lr in layers for b in lr["blocks"] if b["block"] != "mlp" and "hist" in b]
    if not blocks:
        return None
    rows: dict[str, dict] = {}
    for b in blocks:
        r = rows.setdefault(
            b["block"],
            {
                "block": b["block"],
                "expert": b["expert"],
                "group": b["group"],
                "hist": np.zeros(len(b["hist"])),
                "frac": [],
            },
        )
        r["hist"] += np.asarray(b["hist"], dtype=np.float64)
        r["frac"].append(b["frac"])
    out = []
    for r in sorted(rows.values(), key=lambda r: (r["expert"] is not None, r["expert"] or 0)):
        out.append({**r, "hist": r["hist"].tolist(), "frac": float(np.mean(r["frac"]))})
    return {"direction": blocks[0]["direction"], "pool_units": blocks[0]["pool"], "rows": out}


def assemble(
    cfg: RunConfig,
    entries: list[Entry],
    pairs: list[tuple[int, int]],
    preps: dict,
    matching: dict,
    layer_results: dict,
    blocked_fn,
    timing: dict,
    bank: list[Signature] | None = None,
) -> dict:
    cc = cfg.compare
    sigs = [load_signature(e.signature_path) for e in entries]
    null = bank_null(bank) if bank else None
    act_bank = activation_bank(bank) if bank else None
    by_pair: dict[int, list[dict]] = {}
    for (k, _la, _lb, _), res in sorted(layer_results.items(), key=lambda kv: kv[0][:3]):
        by_pair.setdefault(k, []).append(res)
    out_pairs = []
    for k, (i, j) in enumerate(pairs):
        a, b = entries[i], entries[j]
        sa, sb = sigs[i], sigs[j]
        scores = profile_scores(sa, sb)
        calib = calibrate(scores, null)
        # screening only, like `scores`: nothing below feeds it into `decide` or the evidence
        act = activation_profile(sa, sb, (a.name, b.name), act_bank)
        blocked = blocked_fn(a, b)
        hashes, hash_note = identical_bytes(_hash_view(sa), _hash_view(sb))
        prep = preps.get(k)
        m = matching.get(k)
        layers = by_pair.get(k, [])
        zmat = m["z"] if m else None
        depth_differs = sa.num_layers != sb.num_layers
        fams = (
            []
            if blocked
            else families(
                hashes,
                hash_note,
                prep.align if prep else None,
                prep.head_rows if prep else [],
                layers,
                zmat,
                depth_differs,
            )
        )
        verdict = decide(fams, cc.p_threshold, cc.weak_p, blocked, _no_test_reason(a, b, prep))
        pair = {
            "a": a.name,
            "b": b.name,
            **verdict,
            "honestagi_score": scores["honestagi_score"],
            "activation_score": act["scores"]["activation_score"],
            "evidence": rank_evidence(fams, profile_evidence(scores, calib)),
            "localization": _localization(fams),
            "alignment": prep.align if prep else None,
            "profiles": {
                "scores": scores,
                "calibration": calib,
                "raw": raw_scales(sa, sb),
                "activation_norms": act,
            },
        }
        if m and m["z"] is not None:
            pair["layer_matching"] = {
                "z": np.round(m["z"], 3).tolist(),
                "path": [list(p) for p in m["path"]],
                "monotone_path": [list(p) for p in m["dp_path"]],
                "diagonal_margin": _margin(m["z"], m["dp_path"]),
                "tested": "diagonal" if m["diagonal"] else "monotone matching",
            }
        em = _expert_map(fams, layers)
        if em:
            pair["expert_map"] = em
        out_pairs.append(pair)
    return {
        "format": FORMAT,
        "version": VERSION,
        "p_threshold": cc.p_threshold,
        "weak_p": cc.weak_p,
        "rule": RULE,
        "bank": {
            "folder": cc.bank,
            "pairs": len(next(iter(null.values()), [])) if null else 0,
            "activation_models": act_bank.models if act_bank else 0,
            "activation_pairs": act_bank.pairs if act_bank else 0,
        }
        if cc.bank
        else None,
        "models": [_model_row(e, s) for e, s in zip(entries, sigs, strict=True)],
        "pairs": out_pairs,
        "timing": timing,
        "settings": {
            k: getattr(cc, k)
            for k in (
                "max_tokens",
                "lap_max_units",
                "proj_dim",
                "sketch_dim",
                "max_pool_units",
                "seed",
            )
        },
        "sketches": "none: weight-level tests stream from the checkpoints",
        "profile_signatures": [str(Path(e.signature_path)) for e in entries],
    }


def _margin(z: np.ndarray, path: list[tuple[int, int]]) -> float | None:
    """Mean over matched layers of z(matched) minus the best other z in the same row."""
    if not path:
        return None
    flip = z.shape[0] > z.shape[1]
    vals = []
    for i, j in path:
        row = z[:, j] if flip else z[i, :]
        k = i if flip else j
        others = np.delete(row, k)
        if others.size:
            vals.append(float(row[k] - others.max()))
    return round(float(np.mean(vals)), 3) if vals else None


def _localization(fams: list[dict]) -> dict:
    loc: dict = {}
    for f in fams:
        if f.get("log10_p") is None or f["log10_p"] > math.log10(1e-3):
            continue
        if f["kind"] == "identical_bytes":
            loc["identical_tensors"] = f.get("tensors", [])
        elif f["kind"] == "expert_units":
            loc["experts"] = [e for e in f["experts"] if e["log10_p"] < -3]
            loc["groups"] = f["groups"]
        elif "localization" in f:
            loc[f["kind"]] = f["localization"]
    return loc
