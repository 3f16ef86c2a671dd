"""A rank-0 progress bar with bytes/s and ETA (tqdm), silent elsewhere and when not wanted."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, enabled: bool, label: str) -> None:
        self._bar = (
            tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
                leave=False,
                disable=None,
            )  # None: only on a terminal, never into CI logs
            if enabled and total_bytes > 0
            else None
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
