"""The comparison report: report.json, report.md and its PNG figures, each written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from npu_fp.io.atomic import write_text_atomic
from npu_fp.report import compare_plots


def _clean(x: object) -> object:
    """JSON without NaN / Infinity: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def _p(pair: dict) -> str:
    if pair.get("log10_p") is None:
        return "n/a"
    if pair["log10_p"] < -300:
        return "< 1e-300"
    return f"= {10 ** pair['log10_p']:.2e}"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def write_report(doc: dict, out_dir: Path) -> Path:
    """Figures first, then report.md, then report.json (its presence means complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = _clean(doc)
    figs = compare_plots.write_figures(doc, out_dir)
    doc["figures"] = {k: (v if isinstance(v, str) else dict(v)) for k, v in figs.items()}
    write_text_atomic(out_dir / "report.md", markdown(doc))
    path = write_text_atomic(
        out_dir / "report.json", json.dumps(doc, indent=1, allow_nan=False) + "\n"
    )
    return path


def _cal(c: dict) -> str:
    if not c.get("calibrated"):
        return "uncalibrated"
    z = "n/a" if c.get("z") is None else f"{c['z']:.2f}"
    return f"z {z}, p {c['p_empirical']:.3g} (n={c['n_null']})"


def _activation_lines(act: dict | None) -> list[str]:
    """The pair's activation-norm profile block (screening only)."""
    if not act:
        return []
    head = "Activation-norm profile (screening only, never part of the verdict): "
    if not act.get("available"):
        return ["", head + f"unavailable: {act.get('reason')}."]
    sc, cal = act["scores"], act.get("calibration", {})
    streams = ", ".join(f"{s} {_f(sc.get(f'activation_{s}'))}" for s in ("residual", "attn", "mlp"))
    lay = act.get("layers", {})
    depth = (
        f" ({lay.get('a')} vs {lay.get('b')} layers: resampled onto the deeper)"
        if act.get("interpolated")
        else ""
    )
    out = [
        "",
        head + f"activation_score **{_f(sc.get('activation_score'))}** "
        f"[{_cal(cal.get('activation_score', {}))}]{depth}; per stream {streams}; "
        f"spearman {_f(sc.get('activations_spearman'))} "
        f"[{_cal(cal.get('activations_spearman', {}))}], first differences "
        f"{_f(sc.get('activations_diff'))} [{_cal(cal.get('activations_diff', {}))}]; "
        f"{act.get('calibration_note')}.",
    ]
    if act.get("reason"):
        out.append(f"No seed score: {act['reason']}.")
    st = act.get("settings", {})
    sa = st.get("a") or {}
    shown = ", ".join(f"{k} {sa.get(k)}" for k in ("batch_size", "seq_len", "num_batches"))
    if st.get("comparable"):
        out.append(
            f"Activation settings identical on both sides: corpus {sa.get('corpus')} "
            f"(sha256 {str(sa.get('corpus_sha256'))[:12]}), {shown}."
        )
    if act.get("note"):
        out.append(f"**Caution:** {act['note']}.")
    return out


def markdown(doc: dict) -> str:
    figs = doc.get("figures", {})
    lines = [
        "# npu_fp lineage comparison",
        "",
        f"Verdict threshold: a pair is **related** when the combined weight-level p-value is below "
        f"**{doc['p_threshold']:g}**; it is **independent** only when a weight-level test with "
        f"power ran and p >= {doc['weak_p']:g}. Rule: {doc['rule']}",
        "",
        "Profile scores (HonestAGI and variants, activation norms) are screening only: "
        + (
            f"calibrated against the reference bank `{doc['bank']['folder']}`."
            if doc.get("bank")
            else "**uncalibrated** (no reference bank given: `compare.bank=DIR`)."
        ),
        "",
        "## Models",
        "",
        "| name | arch | layers | experts | path |",
        "|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        lines.append(
            f"| {m['name']} | {m['arch']} | {m['num_layers']} | {m['num_experts']} | "
            f"`{m['path']}` |"
        )
    lines += [
        "",
        "## Verdicts",
        "",
        "| a | b | verdict | p-value | honestagi_score | activation_score | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in doc["pairs"]:
        lines.append(
            f"| {p['a']} | {p['b']} | **{p['verdict']}** | {_p(p).removeprefix('= ')} | "
            f"{_f(p['honestagi_score'])} | {_f(p.get('activation_score'))} | "
            f"{p['reason']} |"
        )
    for key, title in (
        ("verdicts", "Verdict / p-value matrix"),
        ("profiles", "Normalized std per role over depth (the HonestAGI figure)"),
        ("bias_max", "Raw q/k/v bias maximum over depth"),
        ("activation_norms", "Normalized mean activation norm per stream"),
    ):
        if key in figs:
            lines += ["", f"![{title}]({figs[key]})"]
    if "activation_norms" not in figs:
        lines += [
            "",
            "Activation-norm profiles: no compared signature carries activations, so no "
            "scores and no figure (run fingerprint with activations.enabled=true).",
        ]
    for p in doc["pairs"]:
        lines += [
            "",
            f"## {p['a']} vs {p['b']}: {p['verdict']} (p {_p(p)})",
            "",
            f"Reason: {p['reason']}",
            "",
            "Evidence, strongest first:",
            "",
        ]
        lines += _evidence_table(p)
        lines += _activation_lines(p.get("profiles", {}).get("activation_norms"))
        al = p.get("alignment") or {}
        if al:
            lines += ["", f"Residual alignment: {al.get('note', '')}; map: {al.get('map', 'n/a')}"]
        key = f"{p['a']}|{p['b']}"
        for kind, title in (
            ("layers", "Layer x layer matching"),
            ("experts", "Expert -> parent map"),
        ):
            f = figs.get(kind, {}).get(key) if isinstance(figs.get(kind), dict) else None
            if f:
                lines += ["", f"![{title}]({f})"]
    return "\n".join(lines) + "\n"


def _where_text(loc: dict | None) -> str:
    if not loc:
        return "-"
    parts = []
    if loc.get("layer_pairs"):
        shown = ", ".join(f"{a}/{b}" for a, b in loc["layer_pairs"][:8])
        more = f" (+{len(loc['layer_pairs']) - 8})" if len(loc["layer_pairs"]) > 8 else ""
        parts.append(f"layers {shown}{more}")
    if loc.get("roles"):
        parts.append(", ".join(map(str, loc["roles"][:6])))
    if "significant" in loc:
        parts.append(f"{loc['significant']} of {loc['of']} tests at p < 1e-3")
    return "; ".join(parts) or "-"


def _evidence_table(p: dict) -> list[str]:
    """One row per evidence family: does it decide, its null, statistic, p and where."""
    rows = [
        "| family | decides | null hypothesis | statistic | p | where |",
        "|---|---|---|---|---|---|",
    ]
    for e in p["evidence"]:
        pv = "-" if e.get("log10_p") is None else _p(e).removeprefix("= ")
        rows.append(
            f"| `{e['kind']}` | {'yes' if e.get('decisive') else 'no (reported)'} | "
            f"{e.get('null', '-')} | {e['summary']} | {pv} | "
            f"{_where_text(e.get('localization'))} |"
        )
        for x in e.get("excluded", [])[:6]:
            rows.append(f"| | | excluded | {x['where']}: {x['why']} | | |")
    decided = p.get("decided_by")
    head = [
        f"Decided by: `{decided['family']}`"
        if decided and p["verdict"] == "related"
        else "Decided by: no decisive family reached the threshold",
        "",
    ]
    return head + rows


def verdict_summary(report_path: Path) -> str:
    """A few terminal lines: one verdict per pair, then where the full report is."""
    doc = json.loads(Path(report_path).read_text())
    lines = []
    for pair in doc["pairs"]:
        p = pair.get("p_value")
        p_txt = "n/a" if p is None else ("< 1e-300" if p == 0 else f"{p:.2e}")
        score = pair.get("honestagi_score")
        s_txt = "n/a" if score is None else f"{score:.3f}"
        lines.append(
            f"  {pair['a']} vs {pair['b']}: {pair['verdict']} (p {p_txt}; "
            f"honestagi_score {s_txt}, screening only)"
        )
    lines.append(f"report: {Path(report_path).with_suffix('.md')}")
    return "\n".join(lines)
