"""ruff format and ruff check are clean: CI runs the test suite, so this enforces both."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

PATHS = ("npu_fp", "tests", "benchmarks")


def ruff(*args: str) -> subprocess.CompletedProcess:
    # ruff comes with the dev extra, in the interpreter running the tests
    cmd = [sys.executable, "-m", "ruff", *args, *PATHS]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("format", "--check"), ("check",)], ids=["format", "check"])
def test_ruff_is_clean(args: tuple[str, ...]) -> None:
    r = ruff(*args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
