"""Test-only launcher: `npu-fp` with a fault injected after a rank has saved N partial results.

    FAULT=kill|stop|term FAULT_RANK=r FAULT_AFTER=n python tests/fault_inject.py fingerprint ...

Under torchrun every rank runs this file; rank `FAULT_RANK` sends itself SIGKILL (a crash),
SIGSTOP (alive but stuck) or SIGTERM (a scheduler stopping it) right after its n-th work item's
partial result is durable. The fault lands at the same point of the plan every time, so the
tests that resume from it are deterministic. Nothing in npu_fp knows about this file.
"""

from __future__ import annotations

import os
import signal
import sys

from npu_fp.stats import partials

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
_rank = int(os.environ.get("RANK", "0"))
_target = int(os.environ.get("FAULT_RANK", "0"))
_after = int(os.environ.get("FAULT_AFTER", "0"))
_fault = os.environ.get("FAULT")
_saved = 0
_save = partials.PartialStore.save


def _save_then_fault(self: partials.PartialStore, item: int, rows: object) -> None:
    global _saved
    _save(self, item, rows)  # type: ignore[arg-type]
    _saved += 1
    if _fault and _rank == _target and _saved == _after:
        os.kill(os.getpid(), SIGNALS[_fault])


partials.PartialStore.save = _save_then_fault  # type: ignore[method-assign]

if __name__ == "__main__":
    from npu_fp.__main__ import cli

    sys.argv = ["npu-fp", *sys.argv[1:]]
    cli()
