"""The founding question at its real widths: Pangu-Pro-MoE-shaped vs Qwen2.5-14B-shaped replicas.

    python benchmarks/bench_seed_scale.py /tmp/scale-seed [--layers 2] [--ranks 1 2] [--keep]

Writes three sharded bf16 checkpoints with the releases' tensor names and config fields, at the
real widths (hidden 5120, 40 heads, 8 KV heads) but only `--layers` layers:

- `qwen`: Qwen2.5-14B-shaped dense model (FFN 13824, vocabulary 152064, q/k/v biases, untied head);
- `upcycled`: Pangu-Pro-MoE-shaped MoGE model (64 routed experts of 1344 units in 8 groups, a 5376
  shared expert, vocabulary 153376) upcycled from `qwen`: expert e is FFN units
  [(e mod 10) x 1344, +1344) of the same layer, the shared expert units [0, 5376), the first
  152064 embedding and head rows are Qwen's, everything plus 10 % Gaussian noise;
- `independent`: a MoGE model of the same shapes from another seed.

Then `npu-fp compare` of the seed pair on each rank count (fresh signature cache: fingerprints
included), one compare of all three (verdicts of the independent pairs, MoE-vs-MoE included) and
one `npu-fp activations` of the MoGE model. Prints per-phase times, peak RSS per rank, verdicts,
and the projection to 48 layers and to an 8-device node with the arithmetic. The checkpoints are
deleted at the end unless `--keep` (2 layers: about 22 GB).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from npu_fp import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import REPO, run, write_sharded  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 5120, 40, 8, 128
QWEN_FFN, QWEN_VOCAB = 13824, 152064
EXPERTS, EXPERT_UNITS, GROUPS, SHARED_UNITS, PANGU_VOCAB = 64, 1344, 8, 5376, 153376
SLICES = QWEN_FFN // EXPERT_UNITS  # 10 distinct slices of the dense FFN, experts cycle over them
STD, REL_NOISE = 0.02, 0.1
CHUNK_ELEMS = 1 << 24  # fp32 temporaries of generation stay at 64 MiB


def randn(rows: int, cols: int, std: float, g: torch.Generator) -> torch.Tensor:
    """bf16 [rows, cols] Gaussian, generated in row chunks (an embedding in fp32 is 3 GB)."""
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    step = max(1, CHUNK_ELEMS // cols)
    for r in range(0, rows, step):
        out[r : r + step] = (torch.randn(min(step, rows - r), cols, generator=g) * std).to(
            torch.bfloat16
        )
    return out


def noisy(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """x + REL_NOISE * std * N(0, 1), bf16, in row chunks."""
    out = torch.empty_like(x)
    step = max(1, CHUNK_ELEMS // x.shape[-1])
    for r in range(0, x.shape[0], step):
        part = x[r : r + step].float()
        out[r : r + step] = (part + REL_NOISE * std * torch.randn(part.shape, generator=g)).to(
            torch.bfloat16
        )
    return out


def _attention(p: str, g: torch.Generator, o_bias: bool) -> dict[str, torch.Tensor]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {
        p + "self_attn.q_proj.weight": randn(q, HIDDEN, STD, g),
        p + "self_attn.k_proj.weight": randn(kv, HIDDEN, STD, g),
        p + "self_attn.v_proj.weight": randn(kv, HIDDEN, STD, g),
        p + "self_attn.o_proj.weight": randn(HIDDEN, q, STD, g),
        p + "self_attn.q_proj.bias": randn(1, q, 0.5, g)[0],
        p + "self_attn.k_proj.bias": randn(1, kv, 0.5, g)[0],
        p + "self_attn.v_proj.bias": randn(1, kv, 0.5, g)[0],
        p + "input_layernorm.weight": (1 + randn(1, HIDDEN, 0.1, g)[0].float()).bfloat16(),
        p + "post_attention_layernorm.weight": (1 + randn(1, HIDDEN, 0.1, g)[0].float()).bfloat16(),
    }
    if o_bias:
        out[p + "self_attn.o_proj.bias"] = randn(1, HIDDEN, 0.01, g)[0]
    return out


def _globals(vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": randn(vocab, HIDDEN, STD, g),
        "lm_head.weight": randn(vocab, HIDDEN, STD, g),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }


def qwen_shard(i: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Shard 0: embeddings, final norm and head; shard 1 + l: layer l. A pure function of i."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    if i == 0:
        return _globals(QWEN_VOCAB, g)
    p = f"model.layers.{i - 1}."
    return {
        **_attention(p, g, o_bias=False),
        p + "mlp.gate_proj.weight": randn(QWEN_FFN, HIDDEN, STD, g),
        p + "mlp.up_proj.weight": randn(QWEN_FFN, HIDDEN, STD, g),
        p + "mlp.down_proj.weight": randn(HIDDEN, QWEN_FFN, STD, g),
    }


def _moge_router(p: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        p + "mlp.gate.weight": randn(EXPERTS, HIDDEN, STD, g),
        p + "mlp.router_scale": (1 + randn(1, EXPERTS, 0.05, g).float()).bfloat16(),
    }


def upcycled_shard(i: int) -> dict[str, torch.Tensor]:
    dense = qwen_shard(i)
    g = torch.Generator().manual_seed(7_000 + i)
    if i == 0:
        out = {}
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = randn(PANGU_VOCAB - QWEN_VOCAB, HIDDEN, STD, g)
            out[name] = torch.cat([noisy(dense.pop(name), STD, g), extra])
        return {**out, "model.norm.weight": dense["model.norm.weight"]}
    p = f"model.layers.{i - 1}."
    gate, up = dense.pop(p + "mlp.gate_proj.weight"), dense.pop(p + "mlp.up_proj.weight")
    down = dense.pop(p + "mlp.down_proj.weight")
    out = {k: noisy(v.reshape(v.shape[0], -1), STD, g).reshape(v.shape) for k, v in dense.items()}
    out[p + "self_attn.o_proj.bias"] = randn(1, HIDDEN, 0.01, g)[0]
    out.update(_moge_router(p, g))
    for e in range(EXPERTS):
        sl = slice((e % SLICES) * EXPERT_UNITS, (e % SLICES + 1) * EXPERT_UNITS)
        q = p + f"mlp.experts.{e}."
        out[q + "gate_proj.weight"] = noisy(gate[sl], STD, g)
        out[q + "up_proj.weight"] = noisy(up[sl], STD, g)
        out[q + "down_proj.weight"] = noisy(down[:, sl].contiguous(), STD, g)
    q = p + "mlp.shared_expert."
    out[q + "gate_proj.weight"] = noisy(gate[:SHARED_UNITS], STD, g)
    out[q + "up_proj.weight"] = noisy(up[:SHARED_UNITS], STD, g)
    out[q + "down_proj.weight"] = noisy(down[:, :SHARED_UNITS].contiguous(), STD, g)
    return out


def independent_shard(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99_000 + i)
    if i == 0:
        return _globals(PANGU_VOCAB, g)
    p = f"model.layers.{i - 1}."
    out = {**_attention(p, g, o_bias=True), **_moge_router(p, g)}
    for e in range(EXPERTS):
        q = p + f"mlp.experts.{e}."
        out[q + "gate_proj.weight"] = randn(EXPERT_UNITS, HIDDEN, STD, g)
        out[q + "up_proj.weight"] = randn(EXPERT_UNITS, HIDDEN, STD, g)
        out[q + "down_proj.weight"] = randn(HIDDEN, EXPERT_UNITS, STD, g)
    q = p + "mlp.shared_expert."
    out[q + "gate_proj.weight"] = randn(SHARED_UNITS, HIDDEN, STD, g)
    out[q + "up_proj.weight"] = randn(SHARED_UNITS, HIDDEN, STD, g)
    out[q + "down_proj.weight"] = randn(HIDDEN, SHARED_UNITS, STD, g)
    return out


def qwen_config(layers: int) -> dict:
    return {
        **zoo.qwen2_config(
            {
                "hidden_size": HIDDEN,
                "intermediate_size": QWEN_FFN,
                "num_hidden_layers": layers,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
                "vocab_size": QWEN_VOCAB,
            }
        ),
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def pangu_config(layers: int) -> dict:
    """Pangu Pro MoE's release config fields (the names the adapter and the forward read)."""
    return {
        "architectures": ["PanguProMoEForCausalLM"],
        "model_type": "PanguProMoE",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": PANGU_VOCAB,
        "moe_intermediate_size": EXPERT_UNITS,
        "shared_expert_intermediate_size": SHARED_UNITS,
        "num_experts": EXPERTS,
        "num_experts_per_tok": GROUPS,
        "num_groups": GROUPS,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1.6e7,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def write_models(folder: Path, layers: int) -> dict[str, Path]:
    specs = {
        "qwen": (qwen_shard, qwen_config(layers), QWEN_VOCAB),
        "upcycled": (upcycled_shard, pangu_config(layers), PANGU_VOCAB),
        "independent": (independent_shard, pangu_config(layers), PANGU_VOCAB),
    }
    out = {}
    for name, (shard, config, vocab) in specs.items():
        root = folder / name
        out[name] = root
        if (root / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        shards: Iterator[dict] = (shard(i) for i in range(layers + 1))
        write_sharded(root, shards, layers + 1, config, zoo.tokenizer_json(vocab))
        print(f"wrote {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.glob("*.safetensors"))


def activations(model: Path, out: Path) -> dict:
    """One `npu-fp activations` run (1 rank, default corpus and batches, bf16 weights): wall and
    peak RSS (GNU time: the activation job logs no RSS line)."""
    cmd = [
        "/usr/bin/time",
        "-f",
        "maxrss_kib=%M",
        sys.executable,
        "-m",
        "npu_fp",
        "activations",
        f"model.path={model}",
        f"hydra.run.dir={out}",
        "device=cpu",
        "activations.dtype=bfloat16",
        "progress=false",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"wall": wall, "error": r.stderr.strip().splitlines()[-2:]}
    kib = re.findall(r"maxrss_kib=(\d+)", r.stderr)
    return {"wall": wall, "peak_rss_mib": float(kib[-1]) / 1024 if kib else float("nan")}


def layer_arithmetic(proj_dim: int = 256) -> dict[str, float]:
    """FLOPs and bytes of one Qwen x Pangu layer pair as compare does it (see units.py)."""
    expert_rows = EXPERTS * EXPERT_UNITS * 3
    shared_rows, dense_rows = SHARED_UNITS * 3, QWEN_FFN * 3
    projection = 2.0 * (expert_rows + shared_rows + dense_rows) * HIDDEN * proj_dim
    similarity = 2.0 * (expert_rows + shared_rows) * QWEN_FFN * proj_dim
    attn = HEADS * HEAD_DIM * HIDDEN * 2 + KV_HEADS * HEAD_DIM * HIDDEN * 2
    dense_bytes = 2 * (attn + 3 * QWEN_FFN * HIDDEN)
    moge_bytes = 2 * (attn + (EXPERTS * EXPERT_UNITS + SHARED_UNITS) * 3 * HIDDEN)
    return {
        "projection_flop": projection,
        "similarity_flop": similarity,
        "bytes": float(dense_bytes + moge_bytes),
        "laps": 3.0 * (EXPERTS + 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--node-read-gbs", type=float, default=2.0, help="host read GB/s per rank")
    ap.add_argument("--node-tflops", type=float, default=100.0, help="bf16 TFLOP/s per device")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    try:
        report(args)
    finally:
        if not args.keep:
            for name in ("qwen", "upcycled", "independent"):
                shutil.rmtree(args.folder / name, ignore_errors=True)


def report(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    models = write_models(args.folder, args.layers)
    sizes = {k: folder_bytes(v) / 1e9 for k, v in models.items()}
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s: {sizes} GB", file=sys.stderr)
    seed = [models["qwen"], models["upcycled"]]
    runs, stamp = {}, int(time.time())
    for n in args.ranks:  # each with a fresh signature cache: fingerprints included
        runs[n] = run(n, seed, args.folder / f"seed-{n}ranks-{stamp}", "cpu", args.threads)
        print(f"{n} rank(s): {runs[n]['wall']:.0f} s", file=sys.stderr)
    cache = args.folder / f"seed-{args.ranks[0]}ranks-{stamp}" / "cache"  # seed pair reused
    out3 = args.folder / f"all-{stamp}"
    three = run(max(args.ranks), list(models.values()), out3, "cpu", args.threads, cache)
    act = activations(models["upcycled"], args.folder / f"act-{int(time.time())}")

    L = args.layers
    print(
        f"\nseed replicas, {L} layer(s), bf16, host CPUs: {os.cpu_count()}, "
        f"OMP_NUM_THREADS={args.threads}; sizes (GB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items())
        + "\n"
    )
    print(
        "| run | ranks | wall (s) | CPU s, all ranks | fingerprint (s) | align / sketch / layers "
        "(s) | peak RSS per rank (MiB) | verdict | log10 p |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in runs.items():
        ph = r["phases_s"]
        print(
            f"| Qwen vs upcycled | {n} | {r['wall']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['fingerprint_s']:.0f} | "
            f"{ph['align']:.0f} / {ph['sketch']:.0f} / {ph['layers']:.0f} | "
            f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} | {r['verdict']} | "
            f"{r['log10_p']:.0f} |"
        )
    for p in three["doc"]["pairs"]:
        lp = "-" if p["log10_p"] is None else f"{p['log10_p']:.0f}"
        print(
            f"| {p['a']} vs {p['b']} (3-model run) | {max(args.ranks)} | | | | | | "
            f"{p['verdict']} | {lp} |"
        )
    if "error" in act:
        print(f"\nactivations: failed after {act['wall']:.0f} s: {act['error']}")
    else:
        print(
            f"\nactivations of the MoGE replica (1 rank, default corpus and batches, bf16): "
            f"{act['wall']:.0f} s, peak RSS {act['peak_rss_mib']:.0f} MiB"
        )
    _expert_map(runs[min(runs)]["doc"])
    _projection(runs, L, sizes, args)


def _expert_map(doc: dict) -> None:
    """Which dense FFN slice each routed expert matched (the expert -> parent map)."""
    pair = doc["pairs"][0]
    fam = next((e for e in pair["evidence"] if e["kind"] == "expert_units"), None)
    by = pair.get("decided_by") or {}
    print(
        f"\nseed pair: {pair['verdict']}, decided by {by.get('family')} (log10 p {by.get('log10_p')})"
    )
    if fam is None:
        print("no expert_units evidence")
        return
    print(f"expert_units: log10 p {fam['log10_p']}; {fam['summary']}")
    em = pair.get("expert_map") or {}
    rows, right = em.get("rows") or [], 0
    for row in rows:
        e, hist = row["expert"], row["hist"]
        first, last = (0, SHARED_UNITS) if e is None else ((e % SLICES) * EXPERT_UNITS, 0)
        last = last or first + EXPERT_UNITS
        peak = max(range(len(hist)), key=lambda b: hist[b])
        pool = em["pool_units"]
        right += int(first * len(hist) // pool <= peak <= (last - 1) * len(hist) // pool)
    print(
        f"expert -> parent map: {right} of {len(rows)} blocks (64 experts and the shared one) "
        f"peak inside the FFN slice they were cut from"
    )


def _projection(runs: dict, L: int, sizes: dict, args: argparse.Namespace) -> None:
    one = runs[min(runs)]
    ph = one["phases_s"]
    per_layer = (ph["sketch"] + ph["layers"]) / L
    pairwise48 = ph["align"] + 48 * per_layer
    layer_gb = (sizes["qwen"] + sizes["upcycled"]) / L  # upper bound: embeddings counted too
    fp48 = one["fingerprint_s"] * 48 / L
    print(
        f"\nprojection to 48 layers, 1 rank here: align {ph['align']:.0f} s + 48 x "
        f"{per_layer:.1f} s (sketch + layers per layer) = {pairwise48 / 60:.1f} min pairwise; "
        f"fingerprints (not cached) about {fp48 / 60:.1f} min more "
        f"({one['fingerprint_s']:.0f} s x 48 / {L})"
    )
    busy = one["cpu_s"] / one["wall"]  # < 1 when other processes share the cores
    print(
        f"on an idle core (1 rank, {args.threads} thread: the rank ran {busy:.0%} of its wall "
        f"time; load average now {os.getloadavg()[0]:.1f}): about "
        f"{pairwise48 * busy / 60:.1f} min pairwise"
    )
    for n, r in runs.items():
        if n != min(runs):
            print(
                f"{n} ranks: pairwise {r['pairwise_s']:.0f} s vs {one['pairwise_s']:.0f} s "
                f"on {min(runs)} ({one['pairwise_s'] / r['pairwise_s']:.2f}x)"
            )
    a = layer_arithmetic()
    read_s = a["bytes"] / 1e9 / args.node_read_gbs
    flop_s = (a["projection_flop"] + a["similarity_flop"]) / 1e12 / args.node_tflops
    lap_s = a["laps"] * 0.19
    print(
        f"\nper layer pair: {a['bytes'] / 1e9:.2f} GB read, projection "
        f"{a['projection_flop'] / 1e12:.2f} TFLOP + similarity "
        f"{a['similarity_flop'] / 1e12:.2f} TFLOP (bf16), at most {a['laps']:.0f} host LAPs "
        f"of 1344 x 13824 (0.19 s each, only when the argmax is contested); measured "
        f"{layer_gb:.1f} GB per layer on disk here"
    )
    node = 48 / 8 * (max(read_s, flop_s) + 0.0)
    print(
        f"8-device node (assumed {args.node_read_gbs} GB/s host read per rank, "
        f"{args.node_tflops} TFLOP/s bf16 per device): 6 layers per rank x max(read "
        f"{read_s:.2f} s, maths {flop_s:.3f} s) = {node:.0f} s, plus up to 6 x {lap_s:.0f} s "
        f"of LAPs for contested (independent) experts, plus align ({ph['align']:.0f} s here, "
        f"one embedding read per pair); {math.ceil((node + 6 * lap_s) / 60)} min at most"
    )


if __name__ == "__main__":
    main()
