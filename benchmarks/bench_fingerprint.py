"""Fingerprint throughput and memory on synthetic bf16 checkpoints (a benchmark, not a test).

    python benchmarks/bench_fingerprint.py --dir /tmp/npfp_bench [--sizes 2,8]

Writes Llama-named checkpoints of the given sizes (GiB) once, warms the page cache, then measures:
raw read (`cat > /dev/null`), a naive script (safetensors `load_file` + `torch.std` in fp32 per
tensor, torch's default threads), and `npu-fp fingerprint` under torchrun with 1 and 2 ranks (wall
time of the whole launch; the job: headers to outputs written; the streaming statistics
phase alone). Peak RSS per rank comes
from each rank's log. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROWS, COLS = 4096, 8192  # 64 MiB per bf16 tensor


def write_checkpoint(root: Path, gib: int) -> Path:
    import torch
    from safetensors.torch import save_file

    d = root / f"synthetic-{gib}g"
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    n = gib * 16
    per_shard = 16  # 1 GiB shards, as real checkpoints ship
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            key = f"model.layers.{i}.mlp.up_proj.weight"
            tensors[key] = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(d / name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": n,
                "hidden_size": COLS,
                "intermediate_size": ROWS,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
            }
        )
    )
    return d


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dt, r


NAIVE = """
import sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
t = time.perf_counter()
for f in sorted(Path(sys.argv[1]).glob('*.safetensors')):
    for name, x in load_file(str(f)).items():
        torch.std(x.float()).item()
print(time.perf_counter() - t)
"""


def fingerprint(model: Path, ranks: int, out: Path) -> tuple[float, float, float, list[float]]:
    wall, r = timed(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "npu_fp",
            "fingerprint",
            f"model.path={model}",
            f"hydra.run.dir={out}",
            "progress=false",
        ]
    )
    log0 = (out / "logs" / "rank0.log").read_text()  # the job's timings, as rank 0 logged them
    job = float(re.findall(r"job: bytes=\d+ seconds=([0-9.]+)", log0)[-1])
    stream = float(re.findall(r"stream_seconds=([0-9.]+)", log0)[-1])
    rss = []
    for rank in range(ranks):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        rss.append(float(re.findall(r"peak RSS (\d+) MiB", text)[-1]))
    return wall, job, stream, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--sizes", default="2,8", help="checkpoint sizes in GiB, comma-separated")
    args = ap.parse_args()
    rows = []
    for gib in [int(s) for s in args.sizes.split(",")]:
        model = write_checkpoint(args.dir, gib)
        nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        gb = nbytes / 1e9
        subprocess.run(f"cat {model}/*.safetensors > /dev/null", shell=True, check=True)
        raw, _ = timed(["bash", "-c", f"cat {model}/*.safetensors > /dev/null"])
        rows.append((gib, "raw read (`cat > /dev/null`, warm)", raw, gb / raw, "-"))
        if gib <= 2:
            _, r = timed([sys.executable, "-c", NAIVE, str(model)])
            naive = float(r.stdout.strip())
            rows.append((gib, "naive: load_file + torch.std(fp32)", naive, gb / naive, "-"))
        for ranks in (1, 2):
            wall, job, stream, rss = fingerprint(model, ranks, args.dir / f"out-{gib}g-{ranks}r")
            rows.append(
                (
                    gib,
                    f"npu-fp, {ranks} rank(s), streaming statistics",
                    stream,
                    gb / stream,
                    " / ".join(f"{x:.0f}" for x in rss),
                )
            )
            rows.append(
                (
                    gib,
                    f"npu-fp, {ranks} rank(s), job (headers to outputs written)",
                    job,
                    gb / job,
                    "-",
                )
            )
            rows.append((gib, f"npu-fp, {ranks} rank(s), whole launch", wall, gb / wall, "-"))
    print("| checkpoint | what | seconds | GB/s | peak RSS per rank (MiB) |")
    print("|---|---|---|---|---|")
    for gib, what, sec, rate, rss in rows:
        print(f"| {gib} GiB bf16 | {what} | {sec:.2f} | {rate:.2f} | {rss} |")


if __name__ == "__main__":
    main()
