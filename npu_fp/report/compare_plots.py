"""PNG figures of the comparison report (matplotlib, written atomically).

Figures are bare `matplotlib.figure.Figure`s, which render with the Agg canvas without pyplot: no
process-wide backend is chosen and no figure registry has to be closed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from npu_fp.arch.base import ATTENTION, QKV_BIASES
from npu_fp.compare.activation_profiles import (
    STREAMS,
    has_activations,
    norm_values,
    settings_differences,
    settings_of,
)
from npu_fp.io.atomic import write_with_atomic
from npu_fp.signature import Signature, SignatureError, load_signature

ROLES = ATTENTION
BIASES = QKV_BIASES
P_CAP = 50.0  # -log10 p beyond this is drawn as the cap


def _save(fig: Figure, path: Path) -> str:
    # bbox "tight" lays the figure out once while saving (tight_layout would draw it twice)
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72, bbox_inches="tight"))
    return path.name


def _legend_outside(fig: Figure, axes: list[Axes]) -> None:
    """One legend for the figure, right of the panels, never over the data."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7)


def _integer_ticks(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def slug(name: str) -> str:
    """A model name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


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
        stem = f"{slug(p['a'])}__{slug(p['b'])}"
        lm = p.get("layer_matching")
        if p["verdict"] == "related" and lm and lm.get("z"):
            figs["layers"][key] = _save(layer_figure(p, lm), out_dir / f"layers_{stem}.png")
        em = p.get("expert_map")
        # a map whose experts agree with no parent unit (dense pairs among them) shows nothing
        if em and any(any(r["hist"]) for r in em.get("rows", [])):
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


def profiles_figure(sigs: list[tuple[str, Signature]]) -> Figure:
    fig = Figure(figsize=(14, 3.2), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    for ax, role in zip(axes, ROLES, strict=True):
        for name, sig in sigs:
            xy = _normalized(sig.profile(role, "std"))
            if xy is not None:
                ax.plot(*xy, marker=".", label=name)
        ax.set_title(f"{role}: per-layer weight std", fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers - 1))")
    axes[0].set_ylabel("std, z-scored over layers")
    _legend_outside(fig, list(axes))
    return fig


def activation_figure(sigs: list[tuple[str, Signature]]) -> Figure:
    """Mean token norm per stream, z-scored over layers, over relative depth; a line per model."""
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(STREAMS), sharey=True)
    for ax, stream in zip(axes, STREAMS, strict=True):
        for name, sig in sigs:
            xy = _normalized(norm_values(sig, stream))
            if xy is not None:
                ax.plot(*xy, marker=".", label=name)
        ax.set_title(f"{stream}: mean token L2 norm", fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers - 1))")
    axes[0].set_ylabel("norm, z-scored over layers")
    _legend_outside(fig, list(axes))
    settings = [settings_of(s) or {} for _, s in sigs]
    if any(settings_differences(settings[0], st) for st in settings[1:]):
        fig.suptitle(
            "activation settings differ between models (corpus / batch shape): "
            "profiles not comparable",
            fontsize=9,
            color="tab:red",
        )
    return fig


def bias_figure(sigs: list[tuple[str, Signature]]) -> Figure:
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, role in zip(axes, BIASES, strict=True):
        for name, sig in sigs:
            ys = sig.profile(role, "max")
            pts = [(i, v) for i, v in enumerate(ys) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_title(f"{role}: signed max", fontsize=9)
        ax.set_xlabel("layer (0-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("bias value (weight units, symlog)")
    if any(ax.lines for ax in axes):
        _legend_outside(fig, list(axes))
    else:
        fig.suptitle("no model has q/k/v biases", fontsize=9)
    return fig


def verdict_figure(doc: dict) -> Figure:
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
    fig = Figure(figsize=(1.2 * n + 3, 1.0 * n + 2))
    ax = fig.subplots()
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=P_CAP)
    for i in range(n):
        for j in range(n):
            if text[i][j].startswith("?"):  # no verdict: grey and hatched, whatever its p
                ax.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, fc="0.85", hatch="//", ec="0.55", lw=0)
                )
    for i in range(n):
        for j in range(n):
            if text[i][j]:
                bright = text[i][j].startswith("?") or (
                    np.isfinite(mat[i, j]) and mat[i, j] > 0.6 * P_CAP
                )
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
        f"verdicts (R related, I independent, ? inconclusive: grey, hatched); "
        f"related when p < {doc['p_threshold']:g}",
        fontsize=9,
    )
    ax.set_xlabel("model")
    ax.set_ylabel("model")
    return fig


def layer_figure(p: dict, lm: dict) -> Figure:
    z = np.asarray(lm["z"], dtype=float)
    side = min(12.0, 4.0 + 0.12 * max(z.shape))  # big enough to read a cell per layer
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    im = ax.imshow(z, cmap="magma", aspect="auto", origin="lower")
    path = lm.get("monotone_path") or []
    if path:
        ax.plot([q[1] for q in path], [q[0] for q in path], "c.-", label="monotone matching")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12))
    _integer_ticks(ax)
    ax.set_xlabel(f"layer of {p['b']} (0-based)")
    ax.set_ylabel(f"layer of {p['a']} (0-based)")
    ax.set_title(
        f"layer x layer z ({p['a']} vs {p['b']}); margin {lm.get('diagonal_margin')}", fontsize=8
    )
    fig.colorbar(im, ax=ax, label="sketch similarity z (standard deviations)")
    return fig


def expert_figure(p: dict, em: dict) -> Figure:
    rows = em["rows"]
    h = np.asarray([r["hist"] for r in rows], dtype=float)
    h = h / np.maximum(h.sum(axis=1, keepdims=True), 1.0)
    fig = Figure(figsize=(8, 0.25 * len(rows) + 2))
    ax = fig.subplots()
    im = ax.imshow(h, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the expert's agreeing units")
    labels = [
        f"{r['block']}"
        + (f" g{r['group']}" if r.get("group") is not None else "")
        + f" ({r['frac']:.0%})"
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    src, dst = (p["a"], p["b"]) if em["direction"] == "a->b" else (p["b"], p["a"])
    ax.set_xlabel(f"unit index of {dst} ({em['pool_units']} units in {h.shape[1]} bins)")
    ax.set_ylabel(f"expert of {src} (share of its units that agree)")
    ax.set_title(
        f"expert -> parent map: units of {src}'s experts that agree on one {dst} unit", fontsize=8
    )
    return fig
