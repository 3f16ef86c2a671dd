"""Run directories, content stamps, resume and faults: all or nothing, never stale, never lost.

In-process cases use the real fingerprint job on tiny checkpoints; the fault cases run the real
CLI (and real torchrun / gloo ranks) through tests/fault_inject.py, which makes one rank crash,
stop or get SIGTERM right after its n-th partial result.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from compare_fixtures import pair, run_compare, write_base
from conftest import REPO, TINY_SHAPE, run_cli
from test_fingerprint_job import SMALL, small_cfg

from npu_fp import zoo
from npu_fp.commands import fingerprint
from npu_fp.compare.inputs import stale_reason
from npu_fp.io import rundir
from npu_fp.io.stamp import StaleSignatureError, file_stamp, windows
from npu_fp.signature import load_signature
from npu_fp.stats.partials import PARTIALS_NAME, PartialStore

INJECT = REPO / "tests" / "fault_inject.py"


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rundir")
    t = zoo.dense_tensors(TINY_SHAPE, seed=0)
    return zoo.write_checkpoint(root / "dense", t, zoo.qwen2_config(TINY_SHAPE))


def outputs(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file() and p.name != rundir.LOCK_NAME}


# --- content stamps -------------------------------------------------------------------------


def test_windows_cover_small_files_and_spread_over_large_ones() -> None:
    assert windows(1000) == [(0, 1000)]
    big = windows(10**9)
    assert big[0][0] == 0 and big[-1][0] + big[-1][1] == 10**9 and len(big) == 8


def swap_weights(folder: Path, other: Path) -> None:
    """Put `other`'s weights into `folder`, keeping the header bytes and the mtime."""
    f, g = folder / "model.safetensors", other / "model.safetensors"
    n = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    assert f.read_bytes()[:n] == g.read_bytes()[:n]  # same shapes: identical headers
    st = f.stat()
    shutil.copyfile(g, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # defeats a size + mtime check


def test_stale_signature_is_never_reused(tmp_path: Path) -> None:
    """The issue's case: A fingerprinted as a copy of B, then A's weights replaced by independent
    same-shape weights (headers and mtime kept); compare must judge what the folder holds."""
    b = write_base(tmp_path / "b", seed=0)
    a = write_base(tmp_path / "a", seed=0)  # a byte copy of b
    indep = write_base(tmp_path / "indep", seed=1)
    sig_a, sig_b = (fingerprint(small_cfg(m, tmp_path / f"fp-{m.name}"))[0] for m in (a, b))
    assert stale_reason(load_signature(sig_a), str(a)) is None
    swap_weights(a, indep)
    why = stale_reason(load_signature(sig_a), str(a))
    assert why is not None and "model.safetensors: sampled bytes changed" in why

    doc = run_compare([], tmp_path / "cmp", signatures=[sig_a, sig_b])
    p = pair(doc, "a", "b")
    assert p["verdict"] != "related", p
    [entry] = [m for m in doc["models"] if m["name"] == "a"]
    assert "fingerprinted again" in entry["weights"]
    assert rundir.verify(tmp_path / "cmp") is None  # the report's files: one committed set
    manifest = json.loads((tmp_path / "cmp" / "manifest.json").read_text())
    assert {"report.json", "report.md", "verdicts.png"} <= set(manifest["files"])

    with pytest.raises(StaleSignatureError, match=r"a/model.safetensors: sampled bytes changed"):
        run_compare([], tmp_path / "cmp2", signatures=[sig_a, sig_b], refingerprint_stale=False)


def test_model_cache_follows_content_not_mtime(tmp_path: Path) -> None:
    b = write_base(tmp_path / "b", seed=0)
    a = write_base(tmp_path / "a", seed=0)
    cache = str(tmp_path / "cache")
    assert pair(run_compare([a, b], tmp_path / "c1", cache_dir=cache), "a", "b")["verdict"] == (
        "related"
    )
    swap_weights(a, write_base(tmp_path / "indep", seed=1))
    after = pair(run_compare([a, b], tmp_path / "c2", cache_dir=cache), "a", "b")
    assert after["verdict"] != "related", after
    assert len(list(Path(cache).iterdir())) == 3  # a (before), a (after), b


def test_stamp_recorded_in_signature(dense: Path, tmp_path: Path) -> None:
    [sig] = fingerprint(small_cfg(dense, tmp_path))
    [f] = load_signature(sig).identity["files"]
    assert f == {
        "name": "model.safetensors",
        "header_sha256": f["header_sha256"],
        **file_stamp(dense / "model.safetensors").as_dict(),
    }


# --- the output set -------------------------------------------------------------------------


def test_output_set_has_a_manifest_written_last(dense: Path, tmp_path: Path) -> None:
    fingerprint(small_cfg(dense, tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"signature.json", "tensors.csv", "profile.png"}
    assert outputs(tmp_path) == {"signature.json", "tensors.csv", "profile.png", "manifest.json"}
    assert rundir.verify(tmp_path) is None
    (tmp_path / "tensors.csv").write_text("edited")
    assert "tensors.csv: missing or changed" in (rundir.verify(tmp_path) or "")
    assert not list(tmp_path.glob(".staging-*")) and not (tmp_path / PARTIALS_NAME).exists()


def test_failed_rerun_moves_the_earlier_set_aside(dense: Path, tmp_path: Path) -> None:
    fingerprint(small_cfg(dense, tmp_path / "out"))
    old = (tmp_path / "out" / "signature.json").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(dense, broken)
    (broken / "model.safetensors").write_bytes(b"\x02" + b"\0" * 7 + b"{}")  # no tensors
    with pytest.raises(ValueError, match="no tensors"):
        fingerprint(small_cfg(broken, tmp_path / "out"))
    # open_model fails before the run takes the directory: the old set is untouched
    assert rundir.verify(tmp_path / "out") is None
    with pytest.MonkeyPatch.context() as mp:  # a failure after the run has begun
        mp.setattr("npu_fp.fingerprint.finish_stats", _boom)
        with pytest.raises(RuntimeError, match="boom"):
            fingerprint(small_cfg(dense, tmp_path / "out"))
    assert outputs(tmp_path / "out") == set()  # nothing that could be taken for this run's
    assert (tmp_path / "out" / rundir.PREVIOUS_NAME / "signature.json").read_bytes() == old


def _boom(*a: object, **k: object) -> None:
    raise RuntimeError("boom")


def test_full_disk_while_staging_leaves_nothing(
    dense: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(doc: dict, out_dir: Path) -> Path:
        (out_dir / "signature.json").write_text('{"half": ')  # what a full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "signature.json"))

    monkeypatch.setattr("npu_fp.commands.write_signature", full)
    with pytest.raises(OSError, match="No space left"):
        fingerprint(small_cfg(dense, tmp_path))
    assert outputs(tmp_path) == set() and not list(tmp_path.glob(".staging-*"))


def test_second_run_into_a_locked_directory_is_refused(dense: Path, tmp_path: Path) -> None:
    with rundir.lock(tmp_path):  # as a concurrent run holds it
        with pytest.raises(rundir.RunDirLockedError, match="another npu-fp run"):
            fingerprint(small_cfg(dense, tmp_path))
        assert outputs(tmp_path) == set()
    fingerprint(small_cfg(dense, tmp_path))  # released with its holder
    assert rundir.verify(tmp_path) is None


def test_lock_dies_with_its_process(dense: Path, tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from npu_fp.io import rundir\n"
        "with rundir.lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.RunDirLockedError, match=f"pid {holder.pid}"):
            fingerprint(small_cfg(dense, tmp_path))
    finally:
        holder.kill()
        holder.wait()
    fingerprint(small_cfg(dense, tmp_path))  # SIGKILL left no stale lock behind


# --- partial results --------------------------------------------------------------------------


def test_torn_or_foreign_records_are_not_reused(tmp_path: Path) -> None:
    rows = torch.arange(26, dtype=torch.float64).view(2, 13)
    store = PartialStore(tmp_path, "k1", 0)
    store.save(3, rows)
    store.save(4, rows + 1)
    store.close()
    [f] = (tmp_path / PARTIALS_NAME / "k1").glob("rank0-*.bin")
    with open(f, "ab") as fh:
        fh.write(f.read_bytes()[:50])  # a record torn by a kill
    got = PartialStore(tmp_path, "k1", 1).load()
    assert set(got) == {3, 4} and torch.equal(got[4], rows + 1)
    raw = bytearray(f.read_bytes())
    raw[-60] ^= 1  # one flipped bit in the last whole record's payload
    f.write_bytes(bytes(raw))
    assert set(PartialStore(tmp_path, "k1", 1).load()) == {3}
    shutil.copy(f, tmp_path / PARTIALS_NAME / "k1" / "copy.bin")
    (tmp_path / PARTIALS_NAME / "k2").mkdir()
    shutil.copy(f, tmp_path / PARTIALS_NAME / "k2" / "rank0-x.bin")
    assert PartialStore(tmp_path, "k2", 0).load() == {}  # sealed to another run's inputs


def fault_run(model: Path, out: Path, fault: str, after: int, *extra: str, n: int = 0, rank=0):
    """The CLI (under torchrun when n > 0) with `fault` on `rank` after `after` partials."""
    env = {"FAULT": fault, "FAULT_RANK": str(rank), "FAULT_AFTER": str(after)}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n else []
    args = [*launch, str(INJECT), "fingerprint", f"model.path={model}", f"hydra.run.dir={out}"]
    return run_cli([*args, *SMALL, "device=cpu", *extra], cwd=out.parent, env=env)


def reuse_counts(out: Path) -> tuple[int, int]:
    """(reused, computed) work items of the latest run, summed over the ranks' logs."""
    reused = computed = 0
    for log in (out / "logs").glob("rank*.log"):
        last = re.findall(r"(\d+) work items reused from partials, (\d+) computed", log.read_text())
        reused += int(last[-1][0])
        computed += int(last[-1][1])
    return reused, computed


def saved_items(out: Path) -> int:
    [key] = list((out / PARTIALS_NAME).iterdir())
    return len(PartialStore(out, key.name, 99).load())


def test_sigterm_leaves_nothing_partial_and_the_rerun_resumes(dense: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    fingerprint(small_cfg(dense, ref))
    out = tmp_path / "out"
    r = fault_run(dense, out, "term", 5)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert outputs(out) == set() and not list(out.glob(".staging-*"))
    assert saved_items(out) == 5
    r = fault_run(dense, out, "", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "signature.json").read_bytes() == (ref / "signature.json").read_bytes()
    total = sum(reuse_counts(ref))
    assert reuse_counts(out) == (5, total - 5)
    assert not (out / PARTIALS_NAME).exists()


def test_partials_of_other_inputs_are_not_reused(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert fault_run(dense, out, "term", 5).returncode == 130
    # another chunk size changes the numbers' order of summation: nothing may be reused
    fingerprint(_cfg(dense, out, chunk_elems=999))
    assert reuse_counts(out)[0] == 0


def _cfg(model: Path, out: Path, chunk_elems: int):
    cfg = small_cfg(model, out)
    return replace(cfg, stats=replace(cfg.stats, chunk_elems=chunk_elems))


@pytest.mark.slow
@pytest.mark.parametrize("rerun_ranks", [2, 1])
def test_two_rank_crash_then_resume_is_byte_identical(
    dense: Path, tmp_path: Path, rerun_ranks: int
) -> None:
    """Rank 1 crashes after 4 items; the rerun (on 2 ranks, or on 1: partials are per work item,
    not per rank) computes only what no valid record holds."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert fault_run(dense, ref, "", 0, n=2).returncode == 0
    r = fault_run(dense, out, "kill", 4, n=2, rank=1)
    assert r.returncode != 0 and not (out / "signature.json").exists()
    done = saved_items(out)
    assert done >= 4
    shutil.rmtree(out / "logs")  # only the rerun's counts below
    r = fault_run(dense, out, "", 0, n=rerun_ranks if rerun_ranks > 1 else 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "signature.json").read_bytes() == (ref / "signature.json").read_bytes()
    total = sum(reuse_counts(ref))
    assert reuse_counts(out) == (done, total - done)  # only the missing items were computed


@pytest.mark.slow
def test_stopped_rank_is_named_within_the_timeout(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "FAULT": "stop", "FAULT_RANK": "1", "FAULT_AFTER": "1"}
    cmd = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(INJECT)),
        *("fingerprint", f"model.path={dense}", f"hydra.run.dir={out}", *SMALL, "device=cpu"),
        "dist.timeout_s=3",
    ]
    # its own session: the stopped rank is killed with the group once rank 0 has named it
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path
    )
    guard = threading.Timer(180, os.killpg, (proc.pid, signal.SIGKILL))  # only a hang gets here
    guard.start()
    seen = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if "npu-fp: error:" in line:
                break
    finally:
        guard.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    err = "".join(seen)
    assert "npu-fp: error: rank 1 did not send" in err, err[-3000:]
    assert "dist.timeout_s=3 s" in err and "rerun the same command to resume" in err
    assert not (out / "signature.json").exists()
