"""Resume after a crash: a 2-rank fingerprint killed at about half, then rerun (a benchmark).

    python benchmarks/bench_resume.py --dir /tmp/rundir-bench [--gib 2] [--repeats 3]

Writes a synthetic bf16 checkpoint (bench_fingerprint's layout: 64 MiB tensors in 1 GiB shards),
warms the page cache, then per repeat: an undisturbed 2-rank run; a run whose rank 1 sends itself
SIGKILL right after finishing half of its work items (tests/fault_inject.py; torchrun then stops
rank 0); and a rerun of the killed command into the same run directory. Prints the wall time of
each launch, the job's own time (headers to outputs written, from its `job:` line), the items
the rerun reused and computed (from the rank logs), and whether the rerun's signature is
byte-identical to the undisturbed one. The checkpoint is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fingerprint import write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INJECT = REPO / "tests" / "fault_inject.py"


def launch(
    model: Path, out: Path, fault_after: int = 0
) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "FAULT": "kill" if fault_after else "", "FAULT_RANK": "1"}
    env["FAULT_AFTER"] = str(fault_after)
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
        *(str(INJECT), "fingerprint", f"model.path={model}", f"hydra.run.dir={out}"),
        *("device=cpu", "progress=false"),
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t, r


def job_seconds(r: subprocess.CompletedProcess, field: str = "seconds") -> float:
    return float(re.search(rf"job: .* {field}=([0-9.]+)", r.stdout).group(1))


def reuse_counts(out: Path) -> tuple[int, int]:
    reused = computed = 0
    for log in (out / "logs").glob("rank*.log"):
        found = re.findall(
            r"(\d+) work items reused from partials, (\d+) computed", log.read_text()
        )
        reused, computed = reused + int(found[-1][0]), computed + int(found[-1][1])
    return reused, computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--gib", type=int, default=2, help="checkpoint size in GiB (>= 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    args = ap.parse_args()
    model = write_checkpoint(args.dir, args.gib)
    subprocess.run(f"cat {model}/*.safetensors > /dev/null", shell=True, check=True)
    items_per_rank = args.gib * 16 // 2  # 64 MiB tensors, one work item each, balanced
    rows = []
    for rep in range(args.repeats):
        ref, out = args.dir / f"ref-{rep}", args.dir / f"out-{rep}"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        t_ref, r = launch(model, ref)
        if r.returncode != 0:
            sys.exit(f"undisturbed run failed:\n{r.stderr[-3000:]}")
        job_ref, stream_ref = job_seconds(r), job_seconds(r, "stream_seconds")
        t_kill, r = launch(model, out, fault_after=items_per_rank // 2)
        if r.returncode == 0:
            sys.exit("the killed run finished: the fault was not injected")
        t_rerun, r = launch(model, out)
        if r.returncode != 0:
            sys.exit(f"rerun failed:\n{r.stderr[-3000:]}")
        same = (out / "signature.json").read_bytes() == (ref / "signature.json").read_bytes()
        rows.append(
            (
                *(t_ref, t_kill, t_rerun, reuse_counts(out), same),
                *(job_ref, job_seconds(r), stream_ref, job_seconds(r, "stream_seconds")),
            )
        )
        print(
            f"repeat {rep}: undisturbed {t_ref:.2f} s (job {job_ref:.2f} s), killed at "
            f"{t_kill:.2f} s, rerun {t_rerun:.2f} s (job {job_seconds(r):.2f} s), "
            f"reused / computed {reuse_counts(out)}, identical bytes: {'yes' if same else 'no'}"
        )
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    med = statistics.median
    print(f"\n{args.gib} GiB bf16, 2 CPU ranks, median of {args.repeats}:")
    print("| | undisturbed | killed at | rerun | rerun / undisturbed |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| whole launch (s) | {med(r[0] for r in rows):.2f} | {med(r[1] for r in rows):.2f} | "
        f"{med(r[2] for r in rows):.2f} | {med(r[2] / r[0] for r in rows):.2f} |"
    )
    print(
        f"| job: headers to outputs (s) | {med(r[5] for r in rows):.2f} | - | "
        f"{med(r[6] for r in rows):.2f} | {med(r[6] / r[5] for r in rows):.2f} |"
    )
    print(
        f"| statistics phase (s) | {med(r[7] for r in rows):.2f} | - | "
        f"{med(r[8] for r in rows):.2f} | {med(r[8] / r[7] for r in rows):.2f} |"
    )
    reused, computed = rows[-1][3]
    print(
        f"\nrerun reused {reused} and computed {computed} work items; identical bytes: "
        f"{'yes' if all(r[4] for r in rows) else 'no'}"
    )
    if not args.keep:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
