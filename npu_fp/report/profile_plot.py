"""The per-layer profile figure: std per role over depth, one panel per role family."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from npu_fp.io.atomic import write_with_atomic  # noqa: E402
from npu_fp.signature import Signature  # noqa: E402

PANELS = {
    "attention": ("attn.q", "attn.k", "attn.v", "attn.o"),
    "attention biases": ("attn.q_bias", "attn.k_bias", "attn.v_bias", "attn.o_bias"),
    "MLA": ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b"),
    "FFN": ("mlp.gate", "mlp.up", "mlp.down"),
    "MoE experts (pooled)": ("moe.expert.gate", "moe.expert.up", "moe.expert.down"),
    "shared experts / router": (
        "moe.shared.gate",
        "moe.shared.up",
        "moe.shared.down",
        "moe.router",
    ),
    "norms": ("norm.input", "norm.post_attn", "norm.attn_out", "norm.mlp_out"),
}


def plot_profiles(sigs: list[Signature], path: Path, stat: str = "std") -> Path:
    panels = [
        (t, [r for r in roles if any(s.profile(r, stat).count(None) < s.num_layers for s in sigs)])
        for t, roles in PANELS.items()
    ]
    panels = [(t, roles) for t, roles in panels if roles]
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.4 * n), squeeze=False)
    for ax, (title, roles) in zip(axes[:, 0], panels, strict=False):
        for sig in sigs:
            for role in roles:
                ys = sig.profile(role, stat)
                xs = [i for i, v in enumerate(ys) if v is not None]
                label = f"{sig.name}: {role}" if len(sigs) > 1 else role
                ax.plot(xs, [ys[i] for i in xs], marker=".", label=label)
        ax.set_title(f"{title}: per-layer {stat}")
        ax.set_xlabel("layer")
        ax.legend(fontsize=6, ncol=2)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no per-layer roles", ha="center")
    fig.tight_layout()
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return path
