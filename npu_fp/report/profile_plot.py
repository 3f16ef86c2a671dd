"""The per-layer profile figure: std per role over depth, one panel per role family."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from npu_fp.arch.base import (
    ATTENTION,
    ATTENTION_BIASES,
    DENSE_FFN,
    EXPERT_FFN,
    LAYER_NORMS,
    MLA,
    SHARED_FFN,
)
from npu_fp.io.atomic import write_with_atomic
from npu_fp.signature import Signature

PANELS = {
    "attention": ATTENTION,
    "attention biases": ATTENTION_BIASES,
    "MLA": MLA,
    "FFN": DENSE_FFN,
    "MoE experts (pooled)": EXPERT_FFN,
    "shared experts / router": (*SHARED_FFN, "moe.router"),
    "norms": LAYER_NORMS,
}


def plot_profiles(sigs: list[Signature], path: Path, stat: str = "std") -> Path:
    panels = [
        (t, [r for r in roles if any(s.profile(r, stat).count(None) < s.num_layers for s in sigs)])
        for t, roles in PANELS.items()
    ]
    panels = [(t, roles) for t, roles in panels if roles]
    n = max(1, len(panels))
    # a bare Figure renders with the Agg canvas without pyplot: no process-wide backend is set
    fig = Figure(figsize=(10, 2.4 * n))
    axes = fig.subplots(n, 1, squeeze=False)
    for ax, (title, roles) in zip(axes[:, 0], panels, strict=False):
        for sig in sigs:
            for role in roles:
                ys = sig.profile(role, stat)
                xs = [i for i, v in enumerate(ys) if v is not None]
                label = f"{sig.name}: {role}" if len(sigs) > 1 else role
                ax.plot(xs, [ys[i] for i in xs], marker=".", label=label)
        ax.set_title(f"{title}: per-layer {stat}")
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel(f"weight {stat} (weight units)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no per-layer roles", ha="center")
    fig.tight_layout()
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
    return path
