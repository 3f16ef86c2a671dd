"""Activation-norm profile scores: the seed HonestAGI construction on per-layer activation norms.

HonestAGI's activation variant: the norm of each layer's activations, normalized across layers the same
way as the parameter profiles. A signature fingerprinted with `activations.enabled=true` carries,
per layer and stream (residual, attn, mlp), the mean over tokens of the token L2 norm; per stream
that sequence goes through exactly the parameter construction (`profiles.construct`: z-scored
across layers, the shorter resampled onto the longer depth with `np.interp`, Pearson), and
`activation_score` is the mean over the three streams. Spearman and first-difference variants and
the bank calibration (empirical null: z and p) follow the parameter profile scores.

Norms grow with depth in every pre-norm model, so the shared trend alone says little (the `_diff`
variant removes it). Norms from different corpora or batch shapes are not comparable; the settings
of both sides are reported and differences flagged. Screening only: never part of a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from npu_fp.compare.profiles import MIN_LAYERS, VARIANTS, calibrate, construct
from npu_fp.forward.stream import STREAMS  # the streams the activation step measures
from npu_fp.signature import Signature

# what shapes the norms: a difference in any of these makes two profiles incomparable
COMPARED_SETTINGS = ("corpus_sha256", "batch_size", "seq_len", "num_batches")
SHOWN_SETTINGS = ("corpus", *COMPARED_SETTINGS, "seed", "dtype")
HOW = "run fingerprint with activations.enabled=true"
SEED_KEY = "activation_score"
FAMILY = "activations"
MIN_BANK = 3  # as profiles.load_bank: 3 models, 3 pairs, the fewest `calibrate` uses


def has_activations(sig: Signature) -> bool:
    act = sig.doc.get("activations")
    return isinstance(act, dict) and bool(act.get("rows"))


def norm_values(sig: Signature, stream: str) -> list[float | None]:
    """Per-layer `mean_norm` of `stream`, indexed by layer (None: absent or not finite)."""
    rows = [
        r
        for r in (sig.doc.get("activations") or {}).get("rows") or []
        if r.get("stream") == stream and isinstance(r.get("layer"), int) and r["layer"] >= 0
    ]
    out: list[float | None] = [None] * (max((r["layer"] for r in rows), default=-1) + 1)
    for r in rows:
        v = r.get("mean_norm")
        out[r["layer"]] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return out


def norm_curve(sig: Signature, stream: str) -> np.ndarray | None:
    """Finite per-layer mean norms (other layers dropped, as `profiles.curve` does); None with
    fewer than MIN_LAYERS."""
    vals = [v for v in norm_values(sig, stream) if v is not None]
    return np.asarray(vals, dtype=np.float64) if len(vals) >= MIN_LAYERS else None


def activation_scores(a: Signature, b: Signature) -> dict[str, float | None]:
    """`activation_score` (seed: mean over streams of Pearson, None unless all three exist),
    `activations[_spearman|_diff]` (mean over the streams that have one), `activation_<stream>`."""
    curves = {s: (norm_curve(a, s), norm_curve(b, s)) for s in STREAMS}
    per = {s: construct(*curves[s]) for s in STREAMS}
    out: dict[str, float | None] = {
        SEED_KEY: None
        if any(r is None for r in per.values())
        else float(np.mean(list(per.values())))
    }
    for suffix, corr, diff in VARIANTS:
        rs = [r for s in STREAMS if (r := construct(*curves[s], corr, diff)) is not None]
        out[FAMILY + suffix] = float(np.mean(rs)) if rs else None
    out.update({f"activation_{s}": per[s] for s in STREAMS})
    return out


def empty_scores() -> dict[str, float | None]:
    keys = [SEED_KEY, *(FAMILY + v[0] for v in VARIANTS), *(f"activation_{s}" for s in STREAMS)]
    return dict.fromkeys(keys)


def settings_of(sig: Signature) -> dict | None:
    if not has_activations(sig):
        return None
    st = sig.doc["activations"].get("settings") or {}
    return {k: st.get(k) for k in SHOWN_SETTINGS}


def _shown(key: str, v: object) -> str:
    return str(v)[:12] if key.endswith("sha256") and isinstance(v, str) else str(v)


def settings_differences(sa: dict, sb: dict) -> list[str]:
    """`key: a vs b` per compared setting that differs (digests shortened to 12 characters)."""
    return [
        f"{k}: {_shown(k, sa.get(k))} vs {_shown(k, sb.get(k))}"
        for k in COMPARED_SETTINGS
        if sa.get(k) != sb.get(k)
    ]


@dataclass(frozen=True)
class ActivationBank:
    """The empirical null of the activation scores over bank pairs that both carry activations."""

    null: dict[str, list[float]]
    models: int  # bank signatures with activations
    pairs: int
    settings: list[dict] = field(default_factory=list)  # of those bank signatures


def activation_bank(bank: list[Signature]) -> ActivationBank:
    sigs = [s for s in bank if has_activations(s)]
    null: dict[str, list[float]] = {}
    pairs = 0
    for a, b in combinations(sigs, 2):
        pairs += 1
        for k, v in activation_scores(a, b).items():
            if v is not None:
                null.setdefault(k, []).append(v)
    return ActivationBank(null, len(sigs), pairs, [settings_of(s) or {} for s in sigs])


def _unavailable_reason(a: Signature, b: Signature, names: tuple[str, str]) -> str | None:
    lacking = [
        f"{n} ({s.path})" if s.path else n
        for n, s in zip(names, (a, b), strict=True)
        if not has_activations(s)
    ]
    if not lacking:
        return None
    which = "signature " if len(lacking) == 1 else "signatures "
    return f"no activations in {which}{' and '.join(lacking)}: {HOW}"


def _score_gap(a: Signature, b: Signature, names: tuple[str, str]) -> str:
    """Why a pair with activations on both sides still has no seed score."""
    parts = []
    for s in STREAMS:
        for n, sig in zip(names, (a, b), strict=True):
            c = norm_curve(sig, s)
            if c is None:
                parts.append(f"{n} {s}: fewer than {MIN_LAYERS} layers with a finite mean_norm")
            elif c.std() == 0:
                parts.append(f"{n} {s}: mean_norm constant over depth")
    return "; ".join(parts) or "no stream gave a correlation"


def _calibration(scores: dict[str, float | None], bank: ActivationBank | None) -> tuple[dict, str]:
    if bank is None:
        return calibrate(scores, None), "uncalibrated (no reference bank: compare.bank=DIR)"
    if bank.models < MIN_BANK:
        note = (
            f"uncalibrated: {bank.models} bank signature(s) carry activations, an empirical "
            f"null needs at least {MIN_BANK} ({HOW} on the bank models)"
        )
        return {k: {"calibrated": False, "n_null": 0} for k in scores}, note
    note = f"empirical null over {bank.pairs} bank pairs with activations"
    return calibrate(scores, bank.null), note


def activation_profile(
    a: Signature, b: Signature, names: tuple[str, str], bank: ActivationBank | None = None
) -> dict:
    """The pair record's `profiles.activation_norms`: scores, calibration, both sides' settings."""
    sa, sb = settings_of(a), settings_of(b)
    out: dict = {
        "available": False,
        "reason": None,
        "scores": empty_scores(),
        "settings": {"a": sa, "b": sb, "differences": [], "comparable": None},
        "note": None,
    }
    reason = _unavailable_reason(a, b, names)
    if reason is not None:
        out["reason"] = reason
        out["calibration"] = {k: {"calibrated": False} for k in out["scores"]}
        out["calibration_note"] = "no score to calibrate"
        return out
    assert sa is not None and sb is not None
    scores = activation_scores(a, b)
    diffs = settings_differences(sa, sb)
    la, lb = (len(norm_values(s, "residual")) for s in (a, b))
    out.update(available=True, scores=scores, layers={"a": la, "b": lb}, interpolated=la != lb)
    out["settings"].update(differences=diffs, comparable=not diffs)
    if scores[SEED_KEY] is None:
        out["reason"] = _score_gap(a, b, names)
    notes = []
    if diffs:
        notes.append(
            "activation settings differ (" + "; ".join(diffs) + "): norms from "
            "different corpora or batch shapes are not comparable, so these scores say "
            "nothing about lineage"
        )
    calib, cnote = _calibration(scores, bank)
    if bank is not None and bank.models >= MIN_BANK:
        other = sorted(
            {d for s in bank.settings for d in settings_differences(sa, s)}
            | {d for s in bank.settings for d in settings_differences(sb, s)}
        )
        out["bank_settings_match"] = not other
        if other:
            notes.append(
                "the bank's activations were taken with other settings ("
                + "; ".join(other)
                + "): its null does not describe these scores"
            )
    out["calibration"], out["calibration_note"] = calib, cnote
    out["note"] = " ".join(notes) or None
    return out
