"""PNG figures of the comparison report (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from npu_fp.compare.activation_profiles import (  # noqa: E402
    STREAMS,
    has_activations,
    norm_values,
    settings_differences,
    settings_of,
)
from npu_fp.io.atomic import write_with_atomic  # noqa: E402
from npu_fp.signature import Signature, SignatureError, load_signature  # noqa: E402

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o")
BIASES = ("attn.q_bias", "attn.k_bias", "attn.v_bias")
P_CAP = 50.0  # -log10 p beyond this is drawn as the cap


def _save(fig: plt.Figure, path: Path) -> str:
    # bbox "tight" lays the figure out once while saving (tight_layout would draw it twice)
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72, bbox_inches="tight"))
    plt.close(fig)
    return path.name


def _slug(name: str) -> str:
    from npu_fp.report.compare_report import slug

    return slug(name)


def write_figures(doc: dict, out_dir: Path) -> dict:
    sigs: list[tuple[str, Signature]] = []
    for m in doc["models"]:
        try:
            sigs.append((m["name"], load_signature(m["signature"])))
        except SignatureError:
            continue
    figs: dict = {
        "profiles": _save(profiles_figure(sigs), out_dir / "profiles_normalized.png"),
        "bias_max": _save(bias_figure(sigs), out_dir / "bias_max.png"),
        "verdicts": _save(verdict_figure(doc), out_dir / "verdicts.png"),
        "layers": {},
        "experts": {},
    }
    acts = [(n, s) for n, s in sigs if has_activations(s)]
    if acts:  # otherwise the report says why there is no figure
        figs["activation_norms"] = _save(activation_figure(acts), out_dir / "activation_norms.png")
    for p in doc["pairs"]:
        key = f"{p['a']}|{p['b']}"
        stem = f"{_slug(p['a'])}__{_slug(p['b'])}"
        lm = p.get("layer_matching")
        if p["verdict"] == "related" and lm and lm.get("z"):
            figs["layers"][key] = _save(layer_figure(p, lm), out_dir / f"layers_{stem}.png")
        em = p.get("expert_map")
        if em and em.get("rows"):
            figs["experts"][key] = _save(expert_figure(p, em), out_dir / f"experts_{stem}.png")
    return figs


def _normalized(ys: list) -> tuple[np.ndarray, np.ndarray] | None:
    pts = [(i, v) for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    sd = y.std()
    return x / max(len(ys) - 1, 1), (y - y.mean()) / sd if sd > 0 else y * 0


def profiles_figure(sigs: list[tuple[str, Signature]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
    for ax, role in zip(axes, ROLES, strict=True):
        for name, sig in sigs:
            xy = _normalized(sig.profile(role, "std"))
            if xy is not None:
                ax.plot(*xy, marker=".", label=name)
        ax.set_title(f"{role}: z-scored std")
        ax.set_xlabel("relative depth")
    axes[0].legend(fontsize=7)
    return fig


def activation_figure(sigs: list[tuple[str, Signature]]) -> plt.Figure:
    """Mean token norm per stream, z-scored over layers, over relative depth; a line per model."""
    fig, axes = plt.subplots(1, len(STREAMS), figsize=(12, 3.4), sharey=True)
    for ax, stream in zip(axes, STREAMS, strict=True):
        for name, sig in sigs:
            xy = _normalized(norm_values(sig, stream))
            if xy is not None:
                ax.plot(*xy, marker=".", label=name)
        ax.set_title(f"{stream}: z-scored mean token norm", fontsize=9)
        ax.set_xlabel("relative depth")
    axes[0].legend(fontsize=7)
    settings = [settings_of(s) or {} for _, s in sigs]
    if any(settings_differences(settings[0], st) for st in settings[1:]):
        fig.suptitle(
            "activation settings differ between models (corpus / batch shape): "
            "profiles not comparable",
            fontsize=9,
            color="tab:red",
        )
    return fig


def bias_figure(sigs: list[tuple[str, Signature]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, role in zip(axes, BIASES, strict=True):
        for name, sig in sigs:
            ys = sig.profile(role, "max")
            pts = [(i, v) for i, v in enumerate(ys) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_title(f"{role}: signed max (raw)")
        ax.set_xlabel("layer")
        ax.set_yscale("symlog", linthresh=1e-3)
    if any(ax.lines for ax in axes):
        axes[0].legend(fontsize=7)
    return fig


def verdict_figure(doc: dict) -> plt.Figure:
    names = [m["name"] for m in doc["models"]]
    n = len(names)
    mat = np.full((n, n), np.nan)
    text = [["" for _ in range(n)] for _ in range(n)]
    pos = {nm: i for i, nm in enumerate(names)}
    for p in doc["pairs"]:
        i, j = pos[p["a"]], pos[p["b"]]
        v = min(-p["log10_p"], P_CAP) if p.get("log10_p") is not None else np.nan
        mat[i, j] = mat[j, i] = v
        lab = {"related": "R", "independent": "I"}.get(p["verdict"], "?")
        pv = (
            ""
            if p.get("log10_p") is None
            else f"\n{10 ** p['log10_p']:.0e}"
            if p["log10_p"] > -300
            else "\n<1e-300"
        )
        text[i][j] = text[j][i] = lab + pv
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=P_CAP)
    for i in range(n):
        for j in range(n):
            if text[i][j]:
                bright = np.isfinite(mat[i, j]) and mat[i, j] > 0.6 * P_CAP
                ax.text(
                    j,
                    i,
                    text[i][j],
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="k" if bright else "w",
                )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    fig.colorbar(im, ax=ax, label=f"-log10 p (capped at {P_CAP:g})")
    ax.set_title(
        f"verdicts (R related, I independent, ? inconclusive); "
        f"threshold p < {doc['p_threshold']:g}",
        fontsize=9,
    )
    return fig


def layer_figure(p: dict, lm: dict) -> plt.Figure:
    z = np.asarray(lm["z"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(z, cmap="magma", aspect="auto", origin="lower")
    path = lm.get("monotone_path") or []
    if path:
        ax.plot([q[1] for q in path], [q[0] for q in path], "c.-", label="monotone matching")
        ax.legend(fontsize=7)
    ax.set_xlabel(f"layer of {p['b']}")
    ax.set_ylabel(f"layer of {p['a']}")
    ax.set_title(
        f"layer x layer z ({p['a']} vs {p['b']}); margin {lm.get('diagonal_margin')}", fontsize=8
    )
    fig.colorbar(im, ax=ax, label="sketch z")
    return fig


def expert_figure(p: dict, em: dict) -> plt.Figure:
    rows = em["rows"]
    h = np.asarray([r["hist"] for r in rows], dtype=float)
    h = h / np.maximum(h.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 2))
    ax.imshow(h, cmap="Blues", aspect="auto", interpolation="nearest")
    labels = [
        f"{r['block']}"
        + (f" g{r['group']}" if r.get("group") is not None else "")
        + f" ({r['frac']:.0%})"
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    src, dst = (p["a"], p["b"]) if em["direction"] == "a->b" else (p["b"], p["a"])
    ax.set_xlabel(f"unit of {dst} ({em['pool_units']} units, {h.shape[1]} bins)")
    ax.set_title(
        f"expert -> parent map: units of {src}'s experts that agree on one {dst} unit", fontsize=8
    )
    return fig
