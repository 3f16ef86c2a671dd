"""`npu-fp benchmark benchmark.pairs=MANIFEST` (npu_fp.commands): a detector's accuracy on labelled
model pairs.

A manifest (JSON) names models and labelled pairs:

    {"models": {"llama2-7b": {"path": "/models/Llama-2-7b-hf"},
                "meta-llama/Llama-2-7b-chat-hf": {"hf": "meta-llama/Llama-2-7b-chat-hf"}},
     "pairs": [{"a": "llama2-7b", "b": "meta-llama/Llama-2-7b-chat-hf", "label": "related"}]}

A model is a `path`, or a Hugging Face id (`hf`) looked up as `models--org--name` under
`benchmark.models_dir` (an HF cache folder), read offline. Pairs whose models are absent are listed
as skipped, never guessed. The labelled pairs are compared (only those, not all N^2 / 2), and the
report gives, overall and per evidence family, ROC AUC and the true-positive rate at a 1 %
false-positive rate (score: -log10 p; a family that did not run scores 0), the verdict counts, and
every false positive with the evidence that decided it. `examples/manifests/` ships published pair
lists (ids and labels only); users with the weights run them here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

LABELS = ("related", "independent")
MAX_MANIFEST_BYTES = 16 << 20


class ManifestError(ValueError):
    """The benchmark manifest is missing, malformed or names an unknown model."""


@dataclass(frozen=True)
class LabelledPair:
    a: str
    b: str
    label: str
    note: str = ""


@dataclass(frozen=True)
class Manifest:
    source: str
    models: dict[str, str | None]  # id -> folder (None: not available here)
    missing: dict[str, str]  # id -> why it is unavailable
    pairs: tuple[LabelledPair, ...]


def _hf_folder(models_dir: str | None, hf_id: str) -> Path | None:
    if not models_dir:
        return None
    return Path(models_dir).expanduser() / ("models--" + hf_id.replace("/", "--"))


def load_manifest(path: str | Path, models_dir: str | None) -> Manifest:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ManifestError(f"{p}: benchmark manifest not found (benchmark.pairs=FILE)")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{p}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"{p}: not valid JSON ({str(e)[:200]})") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("models"), dict)
        or not isinstance(doc.get("pairs"), list)
    ):
        raise ManifestError(f"{p}: expected an object with 'models' (object) and 'pairs' (list)")
    models: dict[str, str | None] = {}
    missing: dict[str, str] = {}
    for mid, spec in doc["models"].items():
        if not isinstance(spec, dict) or not (
            isinstance(spec.get("path"), str) or isinstance(spec.get("hf"), str)
        ):
            raise ManifestError(f"{p}: model {mid!r}: expected {{'path': DIR}} or {{'hf': ID}}")
        folder = (
            Path(spec["path"]).expanduser()
            if isinstance(spec.get("path"), str)
            else _hf_folder(models_dir, spec["hf"])
        )
        if folder is not None and folder.is_dir():
            models[mid] = str(folder)
        else:
            models[mid] = None
            missing[mid] = (
                f"{folder} not found"
                if folder is not None
                else "no path and no benchmark.models_dir to look its hf id up in"
            )
    pairs = []
    for k, entry in enumerate(doc["pairs"]):
        if (
            not isinstance(entry, dict)
            or entry.get("label") not in LABELS
            or entry.get("a") not in models
            or entry.get("b") not in models
            or entry.get("a") == entry.get("b")
        ):
            raise ManifestError(
                f"{p}: pair {k}: expected {{'a': ID, 'b': ID, 'label': "
                f"'related'|'independent'}} with two different ids from 'models'"
            )
        pairs.append(
            LabelledPair(entry["a"], entry["b"], entry["label"], str(entry.get("note", "")))
        )
    if not pairs:
        raise ManifestError(f"{p}: no pairs")
    return Manifest(str(doc.get("source", p)), models, missing, tuple(pairs))


def roc_auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a related pair > score of an independent one), ties counted half."""
    if not pos or not neg:
        return None
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos: list[float], neg: list[float], fpr: float = 0.01) -> float | None:
    """Share of related pairs scoring above every threshold that keeps the false-positive rate
    of the independent pairs at or below `fpr`."""
    if not pos or not neg:
        return None
    allowed = math.floor(fpr * len(neg))
    cut = sorted(neg, reverse=True)[allowed] if allowed < len(neg) else -math.inf
    return float(np.mean([s > cut for s in pos]))


def _score(log10_p: float | None) -> float:
    return 0.0 if log10_p is None else max(0.0, -float(log10_p))


def evaluate(report: dict, manifest: Manifest, names: dict[str, str]) -> dict:
    """Metrics of a compare report against the manifest's labels (`names`: id -> report name)."""
    by_names = {frozenset((p["a"], p["b"])): p for p in report["pairs"]}
    rows, skipped = [], []
    for lp in manifest.pairs:
        if manifest.models[lp.a] is None or manifest.models[lp.b] is None:
            skipped.append(
                {
                    "a": lp.a,
                    "b": lp.b,
                    "label": lp.label,
                    "why": "; ".join(
                        f"{m}: {manifest.missing[m]}" for m in (lp.a, lp.b) if m in manifest.missing
                    ),
                }
            )
            continue
        p = by_names[frozenset((names[lp.a], names[lp.b]))]
        fams = {e["kind"]: e.get("log10_p") for e in p["evidence"] if e.get("decisive")}
        rows.append(
            {
                "a": lp.a,
                "b": lp.b,
                "label": lp.label,
                "verdict": p["verdict"],
                "log10_p": p["log10_p"],
                "families": fams,
                "reason": p["reason"],
                "decided_by": p.get("decided_by"),
                "note": lp.note,
            }
        )

    def metrics(score_of) -> dict:
        pos = [score_of(r) for r in rows if r["label"] == "related"]
        neg = [score_of(r) for r in rows if r["label"] == "independent"]
        return {
            "roc_auc": roc_auc(pos, neg),
            "tpr_at_fpr_1pct": tpr_at_fpr(pos, neg),
            "related": len(pos),
            "independent": len(neg),
        }

    kinds = sorted({k for r in rows for k in r["families"]})
    counts = {
        lab: {
            v: sum(1 for r in rows if r["label"] == lab and r["verdict"] == v)
            for v in ("related", "independent", "inconclusive")
        }
        for lab in LABELS
    }
    return {
        "source": manifest.source,
        "overall": metrics(lambda r: _score(r["log10_p"])),
        "families": {k: metrics(lambda r, k=k: _score(r["families"].get(k))) for k in kinds},
        "verdicts": counts,
        "false_positives": [
            r for r in rows if r["label"] == "independent" and r["verdict"] == "related"
        ],
        "missed": [r for r in rows if r["label"] == "related" and r["verdict"] != "related"],
        "pairs": rows,
        "skipped": skipped,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render(result: dict) -> str:
    o = result["overall"]
    lines = [
        f"# Lineage benchmark: {result['source']}",
        "",
        f"{o['related']} related and {o['independent']} independent pairs compared; "
        f"{len(result['skipped'])} skipped (weights not available).",
        "",
        "| score | ROC AUC | TPR at FPR 1 % |",
        "|---|---|---|",
        f"| overall (combined decisive p) | {_fmt(o['roc_auc'])} | {_fmt(o['tpr_at_fpr_1pct'])} |",
    ]
    for k, m in result["families"].items():
        lines.append(f"| `{k}` | {_fmt(m['roc_auc'])} | {_fmt(m['tpr_at_fpr_1pct'])} |")
    lines += ["", "| label | related | independent | inconclusive |", "|---|---|---|---|"]
    for lab, c in result["verdicts"].items():
        lines.append(f"| {lab} | {c['related']} | {c['independent']} | {c['inconclusive']} |")
    lines += ["", f"## False positives ({len(result['false_positives'])})", ""]
    for r in result["false_positives"]:
        lines.append(f"- {r['a']} vs {r['b']}: p = 10^{r['log10_p']}; {r['reason']}")
    if not result["false_positives"]:
        lines.append("None.")
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['a']} vs {s['b']} ({s['label']}): {s['why']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def summary_line(result: dict, report: Path) -> str:
    """The one line the command prints."""
    o = result["overall"]
    return (
        f"benchmark: {o['related']} related / {o['independent']} independent pairs; ROC AUC "
        f"{_fmt(o['roc_auc'])}; TPR at FPR 1 % {_fmt(o['tpr_at_fpr_1pct'])}; "
        f"{len(result['false_positives'])} false positives; report: {report}"
    )
