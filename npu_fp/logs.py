"""Logging set up by the entry point: one file per rank under OUT/logs, console on rank 0 only."""

from __future__ import annotations

import logging
from pathlib import Path

FORMAT = "%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"


def setup_rank_logging(out_dir: Path, rank: int, level: int = logging.INFO) -> Path:
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    root = logging.getLogger()
    # the job owns logging from here on: drop whatever Hydra or an earlier job installed
    for h in list(root.handlers):
        root.removeHandler(h)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter(FORMAT.format(rank=rank)))
    fh._npu_fp = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    if rank == 0:
        ch = logging.StreamHandler()
        ch.setLevel(logging.WARNING)
        ch.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        ch._npu_fp = True  # type: ignore[attr-defined]
        root.addHandler(ch)
    root.setLevel(level)
    return path
