#!/usr/bin/env bash
# Launch npu_fp on one or more nodes with torchrun; Hydra overrides pass through.
#   NPROC=8 launch/run.sh fingerprint model=pangu_pro_moe
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 launch/run.sh compare compare.models=[A,B]
# Knobs (environment): NPROC (ranks per node, default: visible devices or 1), NNODES (1),
# NODE_RANK (0), MASTER_ADDR / MASTER_PORT (multi-node rendezvous), RUN_DIR (one shared run
# directory for every rank; default outputs/<timestamp>), PYTHON (python3), NPU_FP (the npu-fp
# script; default: the one installed next to $PYTHON, else npu-fp on PATH).
set -euo pipefail

# Never put the working directory on sys.path (Python >= 3.11): launched from inside a downloaded
# model folder, its hydra_plugins/ or a file shadowing a module would otherwise run.
export PYTHONSAFEPATH=1
PYTHON=${PYTHON:-python3}
if [[ -z "${NPU_FP:-}" ]]; then
  NPU_FP="$(dirname "$(command -v "$PYTHON")")/npu-fp"
  [[ -x "$NPU_FP" ]] || NPU_FP=npu-fp
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y%m%d-%H%M%S)}

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" - <<'PY'
import os
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
from npu_fp.device import available_type
import torch
kind = available_type()
print(getattr(torch, kind).device_count() if kind != "cpu" else 1)
PY
)
fi

if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?MASTER_ADDR must be set for multi-node runs}"
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}"
        --nnodes "$NNODES" --node-rank "$NODE_RANK")
else
  # port 0: the OS picks a free port, so parallel jobs on one host never collide
  RDZV=(--rdzv-backend c10d --rdzv-endpoint localhost:0 --nnodes 1)
fi

mkdir -p "$RUN_DIR"
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" \
  --local-ranks-filter 0 --no-python "$NPU_FP" "$@" "hydra.run.dir=$RUN_DIR"
