"""The command line: help, version, misspelt keys and presets, file modes under the umask."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

import npu_fp
from npu_fp.cli import check_overrides
from npu_fp.config import COMMANDS
from npu_fp.io.atomic import write_text_atomic, write_with_atomic

CONF = REPO / "conf"


def npu_fp_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run the console entry point in this process; its exit status."""
    from npu_fp.__main__ import cli

    monkeypatch.setattr(sys, "argv", ["npu-fp", *args])
    try:
        cli()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_help_lists_every_command_with_an_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert npu_fp_cli(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n  {command} " in out and f"npu-fp {command} " in out, command
    for override in ("model.path=DIR", "device=auto|cpu|cuda|npu", "hydra.run.dir=OUT"):
        assert override in out
    assert "  model: deepseek_v3, demo," in out and "device: auto, cpu, cuda, npu" in out
    assert "schema" not in out  # the ConfigStore's schema entries are no presets


def test_command_help_shows_that_commands_knobs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert npu_fp_cli(monkeypatch, "compare", "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("npu-fp compare:")
    assert "compare.p_threshold=1e-06  (float)" in out and "compare.models=[]" in out
    assert "activations.seq_len" not in out  # not a compare knob
    assert npu_fp_cli(monkeypatch, "activations", "--help") == 0
    out = capsys.readouterr().out
    assert "activations.mode=data  (data|pipeline)" in out and "compare.p_threshold" not in out


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert npu_fp_cli(monkeypatch, "--version") == 0
    assert capsys.readouterr().out == f"npu-fp {npu_fp.__version__}\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["plan.segmnt_bytes=1"],
            "unknown key 'plan.segmnt_bytes'; did you mean plan.segment_bytes?",
        ),
        (["compare", "models=[a,b]"], "did you mean compare.models"),
        (["fingerprnt"], "unknown command 'fingerprnt'; did you mean fingerprint?"),
        (["device=tpu"], "no device preset 'tpu'; expected one of auto, cpu, cuda, npu"),
        (["-m", "model=demo,qwen2_5_4b"], "no model preset 'qwen2_5_4b'"),
        (["activations.mode=tensor"], "activations.mode must be one of data, pipeline"),
    ],
)
def test_mistakes_get_a_hint_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert npu_fp_cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("npu-fp: error: ") and message in err, err


def test_valid_overrides_pass_the_check() -> None:
    ok = [
        "model=pangu_pro_moe",
        "model.path=/x",
        "+hydra.job.name=x",
        "hydra.run.dir=out",
        "activations=honestagi",
        "device=cuda",
        "compare.signatures=[a.json,b.json]",
        "activations.dtype=float16,float32",
        "stats={chunk_elems:4096}",
        "--cfg",
        "job",
        "--config-dir=/somewhere",
    ]
    assert check_overrides(ok, CONF) is None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        a = write_text_atomic(tmp_path / "a.json", "{}\n")
        b = write_with_atomic(tmp_path / "b.png", lambda tmp: tmp.write_bytes(b"png"))
    finally:
        os.umask(old)
    assert mode(a) == mode(b) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]  # no temporaries


@pytest.mark.slow
def test_cli_outputs_are_readable_by_the_group(tmp_path: Path) -> None:
    """The whole command under umask 022: every output is 0644, as `open` would make it."""
    from npu_fp import zoo

    shape = dict(zoo.BASE_SHAPE, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    model = zoo.write_checkpoint(
        tmp_path / "m", zoo.dense_tensors(shape, 0), zoo.qwen2_config(shape)
    )
    out = tmp_path / "out"
    code = (
        "import os, sys\nos.umask(0o022)\nfrom npu_fp.__main__ import cli\n"
        f"sys.argv = ['npu-fp', 'fingerprint', 'model.path={model}', 'hydra.run.dir={out}', "
        "'device=cpu', 'progress=false']\ncli()\n"
    )
    r = run_cli(["-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("signature.json", "tensors.csv", "profile.png"):
        assert mode(out / name) == 0o644, name
