#!/usr/bin/env bash
# Ascend NPU launcher: load the CANN environment, then hand over to launch/run.sh.
#   NPROC=8 launch/ascend.sh fingerprint model=pangu_pro_moe device=npu
# ASCEND_HOME (default /usr/local/Ascend) locates the toolkit; ASCEND_RT_VISIBLE_DEVICES picks
# devices (renumbered from 0, ascending).
set -euo pipefail

ASCEND_HOME=${ASCEND_HOME:-/usr/local/Ascend}
set_env="$ASCEND_HOME/ascend-toolkit/set_env.sh"
if [[ ! -f "$set_env" ]]; then
  echo "ascend.sh: $set_env not found; install CANN or set ASCEND_HOME" >&2
  exit 2
fi
# set_env.sh reads unset variables; relax -u while sourcing it
set +u
# shellcheck source=/dev/null
source "$set_env"
# shellcheck source=/dev/null
[[ -f "$ASCEND_HOME/nnal/atb/set_env.sh" ]] && source "$ASCEND_HOME/nnal/atb/set_env.sh"
set -u

# torch_npu is usable here, so let torch's backend autoload register it
export TORCH_DEVICE_BACKEND_AUTOLOAD=${TORCH_DEVICE_BACKEND_AUTOLOAD:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/run.sh" "$@"
