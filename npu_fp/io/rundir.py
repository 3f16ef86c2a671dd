"""A run directory holds one complete output set or none: a lock, staging, and a manifest last.

Why a manifest rather than renaming a staged directory into place: the run directory is not ours
alone (Hydra writes `.hydra/`, every rank writes `logs/`, resumable partials live in
`.partials/`), so the directory itself cannot be swapped. Instead:
- `lock` takes an exclusive `flock` on `OUT/.lock` for the whole run (the kernel drops it when the
  process dies, so no stale lock survives a crash); a second run into the same directory gets
  `RunDirLockedError` at once, before it reads or writes anything.
- `begin` moves the outputs of an earlier run (those its manifest lists, or the known output
  names) into `OUT/.previous/` with the manifest removed first, so nobody takes them for this
  run's outputs; leftover staging folders of a killed run are removed.
- outputs are written into `OUT/.staging-*/` together with their manifest (file names, sizes,
  sha256); only when every byte is on disk does `commit` rename them into place, the manifest
  last, with SIGINT / SIGTERM held back for those few renames. A full disk or a signal before
  that leaves no new file in OUT; the manifest's presence means the set beside it is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from npu_fp.io.validate import InputError

LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"
PREVIOUS_NAME = ".previous"
STAGING_PREFIX = ".staging-"
# what a fingerprint run writes; moved aside even when an older npu_fp left no manifest
KNOWN_OUTPUTS = (
    "signature.json",
    "tensors.csv",
    "profile.png",
    "activations.csv",
    "activations_routing.csv",
    "activations.png",
)


class RunDirLockedError(InputError):
    """Another run holds the run directory."""


@contextlib.contextmanager
def lock(out_dir: Path) -> Iterator[None]:
    """Hold `OUT/.lock` exclusively for the duration; RunDirLockedError if another run has it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(locked_message(out_dir, _holder(fd))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def claimed(
    out_dir: Path, is_main: bool, agree: Callable[[BaseException | None], None]
) -> Iterator[None]:
    """The main rank holds the lock on OUT and has moved an earlier set aside (`begin`) for the
    duration; `agree` (a collective) lets every rank fail alike when it could not."""
    with contextlib.ExitStack() as held:
        error: BaseException | None = None
        if is_main:
            try:
                held.enter_context(lock(out_dir))
                begin(out_dir)
            except (InputError, OSError) as e:
                error = e
        agree(error)
        yield


def held_by(out_dir: Path) -> str | None:
    """The pid recorded by a run that holds OUT's lock right now, or None (probe only)."""
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def locked_message(out_dir: Path, pid: str) -> str:
    return (
        f"{out_dir}: another npu-fp run (pid {pid}) is writing this run directory; "
        "wait for it to finish or choose another hydra.run.dir"
    )


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of the complete set in OUT, or None (no set, or not one this code wrote)."""
    try:
        doc = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) for k in files):
        return None
    return doc


def begin(out_dir: Path) -> None:
    """Under the lock: clear leftovers of killed runs, move an earlier output set aside."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    move_aside(out_dir)


def move_aside(out_dir: Path) -> None:
    """Move the output set in OUT (if any) into OUT/.previous, its manifest first."""
    manifest = read_manifest(out_dir)
    names = set(KNOWN_OUTPUTS) | set(manifest["files"] if manifest else ())
    present = [n for n in sorted(names) if "/" not in n and (out_dir / n).is_file()]
    if not present and not (out_dir / MANIFEST_NAME).exists():
        return
    previous = out_dir / PREVIOUS_NAME
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    # the manifest goes first: from here on OUT does not claim to hold a complete set
    with contextlib.suppress(FileNotFoundError):
        os.replace(out_dir / MANIFEST_NAME, previous / MANIFEST_NAME)
    for n in present:
        os.replace(out_dir / n, previous / n)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # outputs: a few MB at most


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT / SIGTERM wait until the block ends (the renames of a commit are not torn apart)."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def staged_outputs(out_dir: Path) -> Iterator[Path]:
    """Yield a staging folder inside OUT; files written there become OUT's output set on success.

    On any error (or signal) the staging folder is removed and OUT gains nothing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        yield stage
        commit(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(stage: Path, out_dir: Path) -> None:
    names = sorted(p.name for p in stage.iterdir() if p.is_file())
    files = {n: {"size": (stage / n).stat().st_size, "sha256": _sha256(stage / n)} for n in names}
    manifest = json.dumps({"format": "npu_fp.run", "files": files}, indent=1) + "\n"
    with open(stage / MANIFEST_NAME, "w") as f:  # staged too: a full disk fails here, not later
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    for n in names:
        with open(stage / n, "rb") as f:
            os.fsync(f.fileno())
    with _signals_held():
        move_aside(out_dir)  # files a run without the lock (an older npu_fp) left
        for n in names:
            os.replace(stage / n, out_dir / n)
        os.replace(stage / MANIFEST_NAME, out_dir / MANIFEST_NAME)
        shutil.rmtree(out_dir / PREVIOUS_NAME, ignore_errors=True)
    with contextlib.suppress(OSError):  # the renames are durable once the directory is synced
        dfd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def verify(out_dir: Path) -> str | None:
    """Why OUT does not hold a complete output set (missing manifest, changed file), or None."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return f"{out_dir}: no {MANIFEST_NAME}: no complete output set here"
    for name, want in manifest["files"].items():
        p = out_dir / name
        if not p.is_file() or _sha256(p) != want.get("sha256"):
            return f"{p}: missing or changed since the run wrote it"
    return None
