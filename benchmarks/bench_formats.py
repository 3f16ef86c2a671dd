"""Peak memory of reading PyTorch `.bin` and MindSpore `.ckpt` against safetensors (a benchmark).

    python benchmarks/bench_formats.py --dir /tmp/npfp_formats --sizes 1,2 \
        [--mindspore-python /tmp/msvenv/bin/python] [--windows 16,64]

Writes fp16 Llama-named checkpoints of the given sizes (GiB) as safetensors, as `torch.save`
`.bin` and, when a Python with MindSpore 2.x is given, as `.ckpt` written by MindSpore itself
(the largest model holds one 640 MiB tensor, which MindSpore splits at its 512 MiB slice size).
Then runs `npu-fp fingerprint` (one process, cpu) on every copy with each read window
(`stats.read_bytes`, MiB) and reports the wall time and the rank's peak RSS from its log, plus
`torch.load` (no mmap) as the whole-file baseline. Every copy's per-tensor statistics must equal
the safetensors copy's exactly, or the benchmark stops.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROWS, COLS = 4096, 8192  # 64 MiB per fp16 tensor
BIG = (20480, 16384)  # 640 MiB fp16: over MindSpore's 512 MiB slice size
MS_WRITER = """
import sys, mindspore as ms
from safetensors.numpy import load_file
src, dst = sys.argv[1], sys.argv[2]
ms.set_device("CPU")
params = [ms.Parameter(ms.Tensor(v), name=k) for k, v in load_file(src).items()]
ms.save_checkpoint(params, dst)
"""
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": COLS,
    "intermediate_size": ROWS,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": BIG[0],
}


def write_models(root: Path, gib: int, ms_python: str | None) -> dict[str, Path]:
    base = root / f"{gib}g"
    out = {f: base / f for f in ("safetensors", "bin", "ckpt")}
    if not ms_python:
        del out["ckpt"]
    if all((d / "config.json").is_file() for d in out.values()):
        return out
    import torch  # only in the writer process (see main)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(gib)
    tensors = {}
    n = gib * 16
    if gib >= 2:  # one tensor MindSpore slices, in place of ten 64 MiB ones
        tensors["model.embed_tokens.weight"] = (torch.randn(*BIG, generator=g) * 0.02).half()
        n -= 10
    for i in range(n):
        w = torch.randn(ROWS, COLS, generator=g) * 0.02
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = w.half()
    config = json.dumps(CONFIG | {"num_hidden_layers": n})
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(config)
    save_file(tensors, str(out["safetensors"] / "model.safetensors"))
    torch.save(tensors, out["bin"] / "pytorch_model.bin")
    del tensors
    if ms_python:
        src, dst = out["safetensors"] / "model.safetensors", out["ckpt"] / "model.ckpt"
        subprocess.run([ms_python, "-c", MS_WRITER, str(src), str(dst)], check=True)
    return out


def fingerprint(model: Path, out: Path, window_mib: int) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "npu_fp", "fingerprint", f"model.path={model}"]
    cmd += [f"hydra.run.dir={out}", "device=cpu", "progress=false"]
    cmd += [f"stats.read_bytes={window_mib << 20}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    text = (out / "logs" / "rank0.log").read_text()
    rss = float(re.findall(r"peak RSS (\d+) MiB", text)[-1])
    doc = json.loads((out / "signature.json").read_text())
    keys = ("dtype", "numel", "mean", "std", "absmax", "min", "max", "kurtosis", "skew", "hash")
    return wall, rss, {r["name"]: [r[k] for k in keys] for r in doc["tensors"]}


def torch_load_rss(path: Path) -> float:
    code = (
        "import resource, sys, torch; sd = torch.load(sys.argv[1], weights_only=True); "
        "[t.sum() for t in sd.values()]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)
    return float(r.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/npfp_formats"))
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--windows", default="16,64", help="stats.read_bytes values, MiB")
    ap.add_argument("--mindspore-python", default=None)
    ap.add_argument("--write-only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only is not None:
        write_models(args.dir, args.write_only, args.mindspore_python)
        return
    rows = []
    for gib in (int(s) for s in args.sizes.split(",")):
        # written by a child process: Linux keeps ru_maxrss across fork + exec, so a parent
        # that held the tensors would raise every measured child's peak RSS to its own
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--write-only", str(gib)]
        if args.mindspore_python:
            cmd += ["--mindspore-python", args.mindspore_python]
        subprocess.run(cmd, check=True)
        models = write_models(args.dir, gib, args.mindspore_python)  # already there: paths only
        for window in (int(w) for w in args.windows.split(",")):
            reference = None
            for fmt, d in models.items():
                out = args.dir / f"out-{gib}g-{fmt}-{window}m"
                wall, rss, stats = fingerprint(d, out, window)
                if reference is None:
                    reference = stats
                elif stats != reference:
                    sys.exit(f"{fmt} {gib} GiB: statistics differ from the safetensors copy")
                rows.append((gib, fmt, f"npu-fp, window {window} MiB", wall, f"{rss:.0f}"))
        rss = torch_load_rss(models["bin"] / "pytorch_model.bin")
        rows.append((gib, "bin", "torch.load (no mmap) + sum", float("nan"), f"{rss:.0f}"))
    print("| checkpoint | format | read | seconds | peak RSS (MiB) |")
    print("|---|---|---|---:|---:|")
    for gib, fmt, what, wall, rss in rows:
        sec = "-" if wall != wall else f"{wall:.2f}"
        print(f"| {gib} GiB fp16 | {fmt} | {what} | {sec} | {rss} |")


if __name__ == "__main__":
    main()
