"""Outputs of the activation step: activations.csv, activations_routing.csv and activations.png."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from npu_fp.activations import ROUTING_FIELDS, ROW_FIELDS, ActivationResult
from npu_fp.forward.stream import STREAMS
from npu_fp.io.atomic import write_text_atomic, write_with_atomic
from npu_fp.signature import rows_csv


def write_activation_outputs(result: ActivationResult, out_dir: Path) -> list[Path]:
    """activations.csv, activations_routing.csv (MoE only), activations.png and
    activations_reads.json (per-rank checkpoint reads, when recorded), each atomically."""
    out_dir = Path(out_dir)
    paths = [write_text_atomic(out_dir / "activations.csv", rows_csv(result.rows, ROW_FIELDS))]
    if result.routing:
        paths.append(
            write_text_atomic(
                out_dir / "activations_routing.csv", rows_csv(result.routing, ROUTING_FIELDS)
            )
        )
    paths.append(
        write_with_atomic(out_dir / "activations.png", lambda tmp: plot_activations(result, tmp))
    )
    if result.reads:
        text = json.dumps({"mode": result.settings.get("mode"), **result.reads}, indent=1) + "\n"
        paths.append(write_text_atomic(out_dir / "activations_reads.json", text))
    return paths


def plot_activations(result: ActivationResult, path: Path) -> None:
    """Mean +- std of the token norms per layer and stream; right: z-scored over layers."""
    # a bare Figure renders with the Agg canvas without pyplot, so no process-wide backend is set
    fig = Figure(figsize=(12, 4), layout="constrained")
    raw, z = fig.subplots(1, 2)
    for stream in STREAMS:
        rows = [r for r in result.rows if r["stream"] == stream and r["mean_norm"] is not None]
        x = [r["layer"] for r in rows]
        m = torch.tensor([r["mean_norm"] for r in rows], dtype=torch.float64)
        s = torch.tensor([r["std_norm"] for r in rows], dtype=torch.float64)
        raw.plot(x, m.tolist(), marker="o", ms=3, label=stream)
        raw.fill_between(x, (m - s).tolist(), (m + s).tolist(), alpha=0.15)
        sd = m.std() if len(rows) > 1 else torch.tensor(0.0)
        zs = (m - m.mean()) / sd if sd > 0 else torch.zeros_like(m)
        z.plot(x, zs.tolist(), marker="o", ms=3, label=stream)
    st = result.settings
    raw.set(
        xlabel="layer (0-based)",
        ylabel="token L2 norm (mean +- std)",
        yscale="log",
        title=f"{st.get('family', '')}: {st.get('num_batches')} x {st.get('batch_size')} x "
        f"{st.get('seq_len')} tokens",
    )
    z.set(
        xlabel="layer (0-based)",
        ylabel="mean norm, z-scored over layers",
        title="normalized profile",
    )
    for ax in (raw, z):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = raw.get_legend_handles_labels()
    fig.legend(handles, labels, title="stream", loc="outside right center")  # off the data
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
