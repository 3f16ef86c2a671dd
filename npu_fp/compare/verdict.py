"""From test results to a verdict: families, ranked evidence, localization and the rule.

Rule (reported in every report.json):
- `related` when the combined weight-level p-value is below `compare.p_threshold`;
- `independent` when it is not, at least one weight-level test with power ran (shapes or a shared
  vocabulary allowed it), and the combined p-value is at least `compare.weak_p`;
- `inconclusive` otherwise, with the reason. Profile similarity never yields `related`.
Within a family, tests in one layer are combined with the Cauchy combination (they may be copies,
like upcycled experts) and layers with Fisher's method; the smallest family p-value is then
Sidak-corrected for the number of families (see stats.py).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from npu_fp.compare.margins import envelope
from npu_fp.compare.stats import (
    LOG_P_FLOOR,
    cauchy_logp,
    layered_logp,
    log10p,
    log_norm_sf,
    p_value,
    sidak_logp,
)

TIERS = {0: "identical bytes", 1: "identity tests", 2: "matched units", 3: "reported scores"}
LOCAL_P = 1e-3  # a layer / role / expert is named in the localization when its own p is below
RULE = (
    "related: the Sidak-combined p of the decisive weight-level families < p_threshold; "
    "independent: a powered decisive test ran and the combined p >= weak_p; inconclusive "
    "otherwise. Reported scores (vocabulary alignment, in-place correlations, layer "
    "matching, MDIR, profiles) never decide."
)

# The null hypothesis each family's p-value is valid under (report.json carries it per family;
# README "Why you can trust a verdict" gives the real-weight evidence).
NULLS = {
    "identical_bytes": (
        "exact: independently trained models do not share byte-identical non-constant tensors "
        "(xxh3-128 digests of the stored bytes; constant and tiny tensors ignored)"
    ),
    "residual_identity": (
        "exact under permutation-equivariant training: B's residual-stream dimensions are "
        "exchangeable, so embeddings of shared tokens cannot agree dimension by dimension more "
        "than a random permutation does (Chatterjee's permutation bound, no fitted alignment)"
    ),
    "unit_identity": (
        "exact under permutation-equivariant training: B's FFN units and KV groups of each layer "
        "are exchangeable (independent permutations per layer and block), so same-index units "
        "agree no more than under a random permutation (Chatterjee's bound; Fisher across "
        "layers, Cauchy within a layer); the residual map is fitted on embeddings only"
    ),
    "matched_units": (
        "empirical margin: FFN units matched separately by gate, up and down agree no more "
        "often than twice the largest agreement rate seen on real within-model null pairs "
        "(binomial tail over units, Cauchy over layers; compare/margins.py); the analytic "
        "Spearman p is reported as analytic_log10_p and fails on real nulls"
    ),
    "expert_units": (
        "empirical margin: as matched units, for each expert matched into the other model's "
        "FFN unit pool; the envelope also covers real pseudo-expert null pairs"
    ),
    "aligned_weights": (
        "none that holds for trained models: the self-normalised z assumes independent "
        "symmetric entries, which shared token semantics and outlier dimensions violate; "
        "reported, never decisive"
    ),
    "layer_matching": (
        "none that holds for trained models (sketch z of fitted alignments); used to choose "
        "layer pairs, never decisive"
    ),
    "mdir": (
        "MDIR's own bound (arXiv 2508.06309), which assumes independent Gaussian "
        "embeddings; reported, never decisive (README: its bound fails on real pairs)"
    ),
    "profiles": "empirical against a bank of independent signatures when given; never decisive",
}
DECISIVE = frozenset(
    {"identical_bytes", "residual_identity", "unit_identity", "matched_units", "expert_units"}
)


def _entry(
    kind: str,
    tier: int,
    logp: float | None,
    tests: int,
    powered: bool,
    summary: str,
    **extra: object,
) -> dict:
    return {
        "kind": kind,
        "tier": tier,
        "tier_name": TIERS[tier],
        "decisive": kind in DECISIVE,
        "null": NULLS[kind],
        "p_value": None if logp is None else p_value(logp),
        "log10_p": None if logp is None else round(log10p(logp), 3),
        "tests": tests,
        "powered": powered,
        "summary": summary,
        **extra,
    }


def identical_bytes(sig_a: dict, sig_b: dict) -> tuple[list[tuple[str, str]], str | None]:
    """Non-trivial tensors whose stored bytes hash equal, matched by hash (names may differ)."""
    if sig_a.get("segment_bytes") != sig_b.get("segment_bytes"):
        return [], "signatures hashed with different plan.segment_bytes: byte identity not checked"
    by_hash: dict[tuple, str] = {}
    for row in sig_b["rows"]:
        if _hashable(row):
            by_hash.setdefault((row["hash"], row["dtype"], tuple(row["shape"])), row["name"])
    out = []
    for row in sig_a["rows"]:
        if _hashable(row):
            hit = by_hash.get((row["hash"], row["dtype"], tuple(row["shape"])))
            if hit is not None:
                out.append((row["name"], hit))
    return out, None


def _hashable(row: dict) -> bool:
    # constant tensors (zero biases, unit norm gains) are identical in unrelated models too
    return (
        bool(row.get("hash"))
        and not row.get("part")
        and row.get("kind") == "weight"
        and (row.get("numel") or 0) >= 16
        and (row.get("std") or 0.0) > 0.0
    )


def families(
    hashes: list[tuple[str, str]],
    hash_note: str | None,
    align: dict | None,
    head_rows: list[dict],
    layers: list[dict],
    zmat: np.ndarray | None,
    depth_differs: bool,
) -> list[dict]:
    fams = []
    if hashes:
        names = ", ".join(a if a == b else f"{a} = {b}" for a, b in hashes[:6])
        more = f" (+{len(hashes) - 6} more)" if len(hashes) > 6 else ""
        fams.append(
            _entry(
                "identical_bytes",
                0,
                LOG_P_FLOOR,
                len(hashes),
                False,
                f"{len(hashes)} non-constant tensors byte-identical: {names}{more}",
                tensors=[list(h) for h in hashes],
            )
        )
    elif hash_note:
        fams.append(_entry("identical_bytes", 0, None, 0, False, hash_note))
    ident = (align or {}).get("identity")
    if ident and "log_p" in ident:
        fams.append(
            _entry(
                "residual_identity",
                1,
                ident["log_p"],
                1,
                True,
                f"{ident['n']} residual dimensions at the identity over {ident['tokens']} shared "
                f"tokens: mean clamped cosine {ident['mean_diag_cos']:.3f} "
                f"({ident['matching_units']} dims with cosine > 0.5)",
                localization={
                    "layer_pairs": [],
                    "roles": [ident.get("role", "embed.tok")],
                    "significant": int(ident["log_p"] < math.log(LOCAL_P)),
                    "of": 1,
                },
            )
        )
    unit_tests = [t for lr in layers for t in lr.get("identity", []) if "log_p" in t]
    excluded = [t for lr in layers for t in lr.get("identity", []) if "excluded" in t]
    if unit_tests:
        best = min(unit_tests, key=lambda t: t["log_p"])
        agree = sum(t["matching_units"] for t in unit_tests)
        units = sum(t["n"] for t in unit_tests)
        note = f"; {len(excluded)} blocks excluded (degenerate weights)" if excluded else ""
        fams.append(
            _entry(
                "unit_identity",
                1,
                _layered(unit_tests),
                len(unit_tests),
                True,
                f"{agree} of {units} units agree at the same index (cosine > 0.5) over "
                f"{len(unit_tests)} blocks; strongest {_where(best)}{note}",
                localization=_localize(unit_tests),
                excluded=[{"where": _where(t), "why": t["excluded"]} for t in excluded],
            )
        )
    elif excluded:
        fams.append(
            _entry(
                "unit_identity",
                1,
                None,
                0,
                False,
                f"all {len(excluded)} blocks excluded: degenerate weights carry no lineage evidence",
                excluded=[{"where": _where(t), "why": t["excluded"]} for t in excluded],
            )
        )
    inplace = [t for lr in layers for t in lr["inplace"]] + list(head_rows)
    if align and align.get("powered"):
        inplace.append(
            {
                "role": align.get("role", "embed.tok"),
                "layer_a": None,
                "layer_b": None,
                "expert": None,
                "log_p": align["log_p"],
                "z": align["z"],
            }
        )
    if inplace:
        best = min(inplace, key=lambda t: t["log_p"])
        fams.append(
            _entry(
                "aligned_weights",
                3,
                _layered(inplace),
                len(inplace),
                False,
                f"{len(inplace)} same-shape tensors in aligned coordinates; strongest {_where(best)} "
                f"(z = {best['z']:.1f}); nominal p, not valid for trained models",
            )
        )
    if (align or {}).get("mdir"):
        md = align["mdir"]
        fams.append(
            _entry(
                "mdir",
                3,
                md["log_p"],
                1,
                False,
                f"MDIR: {md['tokens']} shared tokens, {md['dims']} dims, "
                f"aligned correlation {md['statistic']:.3f}; its own bound p "
                f"{_p_text(log10p(md['log_p']))}, not valid for trained models",
            )
        )
    if depth_differs and zmat is not None and zmat.size:
        zmax = float(zmat.max())
        i, j = np.unravel_index(int(zmat.argmax()), zmat.shape)
        logp = sidak_logp(log_norm_sf(zmax), int(zmat.size))
        fams.append(
            _entry(
                "layer_matching",
                3,
                logp,
                int(zmat.size),
                False,
                f"best layer pair A{i}~B{j} (z = {zmax:.1f}) over "
                f"{zmat.shape[0]}x{zmat.shape[1]} layer pairs; chooses the layer "
                "pairs tested, never decisive",
            )
        )
    units = [b for lr in layers for b in lr["blocks"] if b["block"] == "mlp" and "z" in b]
    heads = [lr["heads"] for lr in layers if lr.get("heads") and "z" in lr["heads"]]
    if units:
        frac = float(np.mean([b["frac"] for b in units]))
        text = (
            f"FFN units matched separately by gate / up / down agree in {len(units)} layers "
            f"(mean agreement {frac:.0%}, null envelope {envelope(len(units[0]['roles'])):.0%}"
            f" of units)"
        )
        if heads:
            text += f"; heads matched by q / o and k / v reported in {len(heads)} layers"
        margin = [{**b, "log_p": b["margin_log_p"]} for b in units]
        fams.append(
            _entry(
                "matched_units",
                2,
                cauchy_logp([b["log_p"] for b in margin]),
                len(units),
                True,
                text,
                localization=_localize(margin),
                analytic_log10_p=round(log10p(_layered(units + heads)), 3),
            )
        )
    experts = [b for lr in layers for b in lr["blocks"] if b["block"] != "mlp" and "z" in b]
    if experts:
        fams.append(_upcycling(experts))
    dropped = [b for lr in layers for b in lr["blocks"] if "excluded" in b]
    dropped += [lr["heads"] for lr in layers if lr.get("heads") and "excluded" in lr["heads"]]
    skipped = [b for b in dropped if b.get("block") == "all"]  # pools over max_pool_units
    if skipped and not any(f["kind"] in ("matched_units", "expert_units") for f in fams):
        fams.append(
            _entry(
                "expert_units",
                2,
                None,
                0,
                False,
                f"unit matching not run at {len(skipped)} layer pair(s): {skipped[0]['excluded']}",
            )
        )
    for f in fams:
        if f["kind"] in ("matched_units", "expert_units") and dropped:
            f["excluded"] = [
                {
                    "where": f"layers {b.get('layer_a')}/{b.get('layer_b')} "
                    f"{b.get('block', 'heads')}",
                    "why": b["excluded"],
                }
                for b in dropped
            ]
    return fams


def _layered(tests: list[dict]) -> float:
    return layered_logp([((t.get("layer_a"), t.get("layer_b")), t["log_p"]) for t in tests])


def _where(t: dict) -> str:
    where = (
        t["role"]
        if t.get("layer_a") is None
        else f"{t['role']} at layers {t['layer_a']}/{t['layer_b']}"
    )
    return where + (f" expert {t['expert']}" if t.get("expert") is not None else "")


def _localize(tests: list[dict]) -> dict:
    hit = [t for t in tests if t["log_p"] < math.log(LOCAL_P)]
    pairs = sorted({(t["layer_a"], t["layer_b"]) for t in hit if t.get("layer_a") is not None})
    roles = sorted({t.get("role") or t.get("block") or "heads" for t in hit})
    return {
        "layer_pairs": [list(p) for p in pairs],
        "roles": roles,
        "significant": len(hit),
        "of": len(tests),
    }


def _upcycling(blocks: list[dict]) -> dict:
    per_expert: dict[tuple, list[dict]] = defaultdict(list)
    for b in blocks:
        per_expert[(b["block"], b["expert"], b["group"])].append(b)
    experts = []
    for (label, e, g), bs in sorted(
        per_expert.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0)
    ):
        lp = cauchy_logp([b["margin_log_p"] for b in bs])
        experts.append(
            {
                "block": label,
                "expert": e,
                "group": g,
                "layers": len(bs),
                "frac": float(np.mean([b["frac"] for b in bs])),
                "log10_p": log10p(lp),
            }
        )
    by_group: dict[int, list[dict]] = defaultdict(list)
    for b in blocks:
        if b["group"] is not None:
            by_group[b["group"]].append(b)
    groups: dict[int, list[dict]] = defaultdict(list)
    for ex in experts:
        if ex["group"] is not None:
            groups[ex["group"]].append(ex)
    group_rows = [
        {
            "group": g,
            "experts": len(xs),
            "frac": float(np.mean([x["frac"] for x in xs])),
            "log10_p": round(log10p(cauchy_logp([b["margin_log_p"] for b in by_group[g]])), 3),
        }
        for g, xs in sorted(groups.items())
    ]
    frac = float(np.mean([b["frac"] for b in blocks]))
    direction = blocks[0]["direction"]
    src = "A" if direction == "a->b" else "B"
    logp = cauchy_logp([b["margin_log_p"] for b in blocks])
    return _entry(
        "expert_units",
        2,
        logp,
        len(blocks),
        True,
        f"{len(experts)} experts of {src} matched into the other model's FFN units: "
        f"{frac:.0%} of expert units agree with one parent unit" + _prematch_note(blocks),
        direction=direction,
        experts=experts,
        groups=group_rows,
        localization=_localize(
            [{**b, "role": b["block"], "log_p": b["margin_log_p"]} for b in blocks]
        ),
    )


def _prematch_note(blocks: list[dict]) -> str:
    counts = {len(b["candidates"]) for b in blocks if "candidates" in b}
    if not counts:
        return ""
    return (
        f" (pool over compare.max_pool_units: each expert matched into its {min(counts)} to "
        f"{max(counts)} most similar experts by Gram sketch)"
    )


def decide(
    fams: list[dict],
    p_threshold: float,
    weak_p: float,
    blocked: str | None,
    no_test_reason: str = "no weight-level test applies",
) -> dict:
    """The verdict, the combined p-value, the deciding family and the reason.

    Only decisive families (`DECISIVE`: nulls that hold for independently trained models) enter;
    the smallest of their p-values is Sidak-corrected for how many ran."""
    none = {"p_value": None, "log10_p": None, "decided_by": None}
    if blocked:
        return {"verdict": "inconclusive", **none, "reason": blocked}
    weight = [f for f in fams if f["decisive"] and f["log10_p"] is not None]
    if not weight:
        dropped = [x for f in fams for x in f.get("excluded", [])]
        if dropped:
            no_test_reason = (
                f"degenerate weights: {dropped[0]['where']}: {dropped[0]['why']} "
                f"({len(dropped)} blocks excluded)"
            )
        return {"verdict": "inconclusive", **none, "reason": no_test_reason}
    top = min(weight, key=lambda f: (f["log10_p"], f["tier"]))
    logp = sidak_logp(top["log10_p"] * math.log(10.0), len(weight))
    base = {
        "p_value": p_value(logp),
        "log10_p": round(log10p(logp), 3),
        "decided_by": {
            "family": top["kind"],
            "log10_p": top["log10_p"],
            "localization": top.get("localization"),
        },
    }
    if logp < math.log(p_threshold):
        return {
            "verdict": "related",
            **base,
            "reason": f"{top['kind']} (p = {_p_text(top['log10_p'])}): {top['summary']}",
        }
    if not any(f["powered"] for f in weight):
        return {
            "verdict": "inconclusive",
            **base,
            "reason": "no weight-level test with power (shapes and vocabularies do not allow one)",
        }
    if logp < math.log(weak_p):
        return {
            "verdict": "inconclusive",
            **base,
            "reason": f"weak weight-level evidence: p between {p_threshold:g} and {weak_p:g} "
            f"({top['kind']})",
        }
    return {
        "verdict": "independent",
        **base,
        "reason": f"decisive weight-level tests with power found no shared origin "
        f"({', '.join(sorted({f['kind'] for f in weight}))})",
    }


def _p_text(log10_p: float) -> str:
    return f"1e{log10_p:.0f}" if log10_p < -300 else f"{10**log10_p:.3g}"


def rank_evidence(fams: list[dict], profile_entry: dict | None) -> list[dict]:
    """identical bytes > aligned weights > matched units > profiles; strongest first within tier."""
    out = sorted(fams, key=lambda f: (f["tier"], f["log10_p"] if f["log10_p"] is not None else 1.0))
    return out + ([profile_entry] if profile_entry else [])


def profile_evidence(scores: dict, calib: dict) -> dict:
    s = scores.get("honestagi_score")
    c = calib.get("honestagi_score", {})
    if c.get("calibrated"):
        note = f"empirical p = {c['p_empirical']:.3g} against {c['n_null']} bank pairs"
        logp = math.log(c["p_empirical"])
    else:
        note, logp = "uncalibrated (no reference bank)", None
    text = "n/a" if s is None else f"{s:.3f}"
    return _entry(
        "profiles",
        3,
        logp,
        len([v for v in scores.values() if v is not None]),
        False,
        f"honestagi_score {text}, {note}; screening only, never decisive",
    )
