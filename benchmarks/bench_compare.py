"""Benchmark `npu-fp compare` on two ~2 GiB checkpoints with 1 and 2 ranks.

    python benchmarks/bench_compare.py /data/bench-compare [--ranks 1 2] [--gib 2] [--device auto]

The checkpoints (a Qwen2-style base in bf16 and a continued-training derivative of it, sharded by
layer) are written once into FOLDER and reused by later runs. Each rank count runs the real command
under torchrun (`--standalone`, free port) with a fresh signature cache, so every run fingerprints
both models and then compares them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from npu_fp import zoo

REPO = Path(__file__).resolve().parents[1]


def shape_for(gib: float) -> dict[str, int]:
    h, inter, vocab, nh, nkv = 2048, 5632, 32000, 16, 4
    d = h // nh
    per_layer = 2 * h * nh * d + 2 * h * nkv * d + 3 * h * inter
    layers = max(1, round((gib * 2**30 / 2 - 2 * vocab * h) / per_layer))
    return {
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "vocab_size": vocab,
    }


def _layer_tensors(
    shape: dict[str, int], layer: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    h, inter, nh, nkv = (
        shape[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    d, s, p = h // nh, 0.02, f"model.layers.{layer}."

    def w(r: int, c: int, std: float) -> torch.Tensor:
        return (torch.randn(r, c, generator=g) * std).to(torch.bfloat16)

    return {
        p + "self_attn.q_proj.weight": w(nh * d, h, s),
        p + "self_attn.k_proj.weight": w(nkv * d, h, s),
        p + "self_attn.v_proj.weight": w(nkv * d, h, s),
        p + "self_attn.o_proj.weight": w(h, nh * d, s),
        p + "self_attn.q_proj.bias": torch.randn(nh * d, generator=g).to(torch.bfloat16),
        p + "self_attn.k_proj.bias": torch.randn(nkv * d, generator=g).to(torch.bfloat16),
        p + "self_attn.v_proj.bias": torch.randn(nkv * d, generator=g).to(torch.bfloat16),
        p + "mlp.gate_proj.weight": w(inter, h, s),
        p + "mlp.up_proj.weight": w(inter, h, s),
        p + "mlp.down_proj.weight": w(h, inter, s / 4),
        p + "input_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16),
        p + "post_attention_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(
            torch.bfloat16
        ),
    }


def write_sharded(
    root: Path, shards: Iterable[dict[str, torch.Tensor]], count: int, config: dict, tok: str
) -> None:
    """A sharded HF-layout folder; shards are written as they come (one in memory at a time)."""
    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config))
    (tmp / "tokenizer.json").write_text(tok)
    os.replace(tmp, root)


def write_pair(folder: Path, gib: float) -> tuple[Path, Path]:
    base, deriv = folder / "base", folder / "continued"
    if (base / "config.json").is_file() and (deriv / "config.json").is_file():
        return base, deriv
    shape = shape_for(gib)
    g = torch.Generator().manual_seed(0)
    tok = zoo.tokenizer_json(shape["vocab_size"])
    glob = {
        "model.embed_tokens.weight": (
            torch.randn(shape["vocab_size"], shape["hidden_size"], generator=g) * 0.02
        ).to(torch.bfloat16),
        "model.norm.weight": torch.ones(shape["hidden_size"], dtype=torch.bfloat16),
        "lm_head.weight": (
            torch.randn(shape["vocab_size"], shape["hidden_size"], generator=g) * 0.02
        ).to(torch.bfloat16),
    }
    shards = [glob] + [
        _layer_tensors(shape, layer, g) for layer in range(shape["num_hidden_layers"])
    ]
    write_sharded(base, shards, len(shards), zoo.qwen2_config(shape), tok)
    noisy = []
    gn = torch.Generator().manual_seed(1)
    for f in sorted(base.glob("model-*.safetensors")):
        t = load_file(str(f))
        noisy.append(
            {
                k: (v.float() + 0.05 * v.float().std() * torch.randn(v.shape, generator=gn)).to(
                    torch.bfloat16
                )
                for k, v in t.items()
            }
        )
    write_sharded(deriv, noisy, len(noisy), zoo.qwen2_config(shape), tok)
    return base, deriv


def peak_rss_mib(out: Path) -> list[float]:
    """Peak RSS of each rank, from the `peak RSS N MiB` lines of OUT/logs/rank<N>.log."""
    peaks = []
    for log in sorted((out / "logs").glob("rank*.log"), key=lambda p: int(p.stem[4:])):
        found = re.findall(r"peak RSS (\d+) MiB", log.read_text())
        peaks.append(max(map(float, found)) if found else float("nan"))
    return peaks


def _children_cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run(
    nproc: int,
    models: list[Path],
    out: Path,
    device: str,
    threads: int | None = None,
    cache: Path | None = None,
) -> dict:
    """One `npu-fp compare` under torchrun; `threads` sets OMP_NUM_THREADS for every rank."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "npu_fp",
        "compare",
        "compare.models=[" + ",".join(str(m) for m in models) + "]",
        f"hydra.run.dir={out}",
        f"compare.cache_dir={cache or out / 'cache'}",
        f"device={device}",
        "progress=false",
    ]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if r.returncode != 0:
        raise SystemExit(f"compare with {nproc} rank(s) failed:\n{r.stderr[-4000:]}")
    doc = json.loads((out / "report.json").read_text())
    return {
        "wall": wall,
        "cpu_s": cpu,  # user + system seconds of all ranks (and torchrun): wall on idle cores
        **doc["timing"],
        "verdict": doc["pairs"][0]["verdict"],
        "log10_p": doc["pairs"][0]["log10_p"],
        "peak_rss_mib": peak_rss_mib(out),
        "doc": doc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every rank")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base, deriv = write_pair(args.folder, args.gib)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
    print(
        f"checkpoints ready in {time.perf_counter() - t0:.1f} s: 2 x {size:.2f} GiB "
        f"({json.loads((base / 'config.json').read_text())['num_hidden_layers']} layers)",
        file=sys.stderr,
    )
    rows = []
    for n in args.ranks:
        out = args.folder / f"run-{n}ranks-{int(time.time())}"
        rows.append((n, run(n, [base, deriv], out, args.device, args.threads)))
    print(f"\ncompare of two {size:.2f} GiB checkpoints (bf16), host CPUs: {os.cpu_count()}\n")
    print(
        "| ranks | device | command wall (s) | CPU s, all ranks | fingerprint both (s) | "
        "pairwise tests (s) | align / sketch / layers (s) | peak RSS per rank (MiB) | verdict "
        "| log10 p |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        ph = r["phases_s"]
        print(
            f"| {n} | {r['device']} | {r['wall']:.1f} | {r['cpu_s']:.0f} | {r['fingerprint_s']:.1f} | "
            f"{r['pairwise_s']:.1f} | {ph['align']:.1f} / {ph['sketch']:.1f} / "
            f"{ph['layers']:.1f} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} | "
            f"{r['verdict']} | {r['log10_p']:.0f} |"
        )


if __name__ == "__main__":
    main()
