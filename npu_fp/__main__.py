"""Entry point: `npu-fp <command> [hydra overrides]` and `python -m npu_fp <command> ...`.

The command word (fingerprint | compare | activations) becomes the `command=` override; Hydra
composes the config, which is converted once to dataclasses and handed to plain functions.
"""

# no `from __future__ import annotations` here: it is a real import, resolved before the
# working directory is dropped from sys.path
import os
import sys

if __name__ == "__main__":
    # `python -m npu_fp` (and `torchrun -m npu_fp`) put the working directory first on sys.path:
    # run from inside a downloaded model folder, its `hydra_plugins/` or a file shadowing a module
    # we import would execute. Drop it before importing anything else.
    _cwd = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != _cwd]

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch: see device.py

import errno  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from npu_fp.config import COMMANDS, RunConfig, register_configs, to_run_config  # noqa: E402
from npu_fp.io.rundir import held_by, locked_message  # noqa: E402

log = logging.getLogger("npu_fp")


def _conf_dir() -> str:
    here = Path(__file__).resolve().parent
    installed = here / "conf"  # wheels carry conf/ as the npu_fp.conf package
    return str(installed if installed.is_dir() else here.parent / "conf")


def dispatch(cfg: RunConfig) -> object:
    if cfg.command == "fingerprint":
        from npu_fp.fingerprint import fingerprint

        return fingerprint(cfg)
    if cfg.command == "compare":
        from npu_fp.compare.job import compare

        return compare(cfg)
    if cfg.command == "activations":
        from npu_fp.activations import activations

        return activations(cfg)
    if cfg.command == "benchmark":
        from npu_fp.lineage_bench import benchmark

        return benchmark(cfg)
    raise AssertionError(cfg.command)


register_configs()


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="npu_fp")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = to_run_config(dcfg)
        cfg.out_dir = HydraConfig.get().runtime.output_dir
        dispatch(cfg)
    except ValueError as e:  # user errors: named, actionable, no traceback, non-zero exit
        print(f"npu-fp: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (below): cleanup has run, nothing partial
        print("npu-fp: interrupted; outputs left as they were, rerun to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        # the machine, not the code: a full disk or a read-only / forbidden output folder
        where = e.filename or HydraConfig.get().runtime.output_dir
        print(f"npu-fp: error: {where}: {os.strerror(e.errno)}", file=sys.stderr)
        sys.exit(2)


# OSErrors that describe the environment (what a user fixes), not a bug: reported without traceback
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EFBIG,
        errno.EMFILE,
        errno.ENFILE,
    }
)


def check_run_dir(argv: list[str]) -> str | None:
    """Why `hydra.run.dir=...` cannot be a run directory (Hydra itself would fail in makedirs
    with a traceback), or None."""
    for a in argv:
        if a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")):
            p = Path(a.split("=", 1)[1]).expanduser()
            for q in (p, *p.parents):
                if os.path.lexists(q):
                    if not q.is_dir():
                        return f"{a.split('=', 1)[0]}={p}: {q} exists and is not a directory"
                    if not os.access(q, os.W_OK | os.X_OK):
                        return f"{a.split('=', 1)[0]}={p}: {q} is not writable"
                    # before Hydra writes .hydra/ into it; the job's own lock (io/rundir.py)
                    # closes the race. Rank 0 only: the other ranks run beside their rank 0.
                    pid = held_by(p) if os.environ.get("RANK", "0") == "0" else None
                    if pid is not None:
                        return locked_message(p, pid)
                    break
    return None


# Hydra flags followed by a value (which is not a command word)
HYDRA_VALUE_FLAGS = {
    "-c",
    "--cfg",
    "-p",
    "--package",
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "--info",
    "--experimental-rerun",
}


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (torchrun stopping the other ranks, a scheduler) unwinds like Ctrl-C, so every
    `finally` runs: staging removed, locks released, partial results closed."""
    raise KeyboardInterrupt


def cli() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:]
    extra = []
    for i, arg in enumerate(argv):
        if arg.startswith("-") or "=" in arg or (i and argv[i - 1] in HYDRA_VALUE_FLAGS):
            continue
        if arg not in COMMANDS:
            print(
                f"npu-fp: error: unknown command {arg!r}; expected one of {', '.join(COMMANDS)}",
                file=sys.stderr,
            )
            sys.exit(2)
        del argv[i]
        extra.append(f"command={arg}")
        break
    if "RANK" in os.environ and not any(a.startswith("hydra.run.dir=") for a in argv):
        # every rank would resolve ${now:...} on its own and could land in another second: derive
        # one directory from what torchrun gives all ranks alike
        run_id = "-".join(
            os.environ.get(k, "x") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
        )
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if os.environ.get("RANK", "0") != "0":
        # only rank 0 records Hydra's config in the shared run directory
        extra.append("hydra.output_subdir=null")
    why = check_run_dir([*argv, *extra])
    if why:
        print(f"npu-fp: error: {why}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv, *extra]
    _hydra_main()


if __name__ == "__main__":
    cli()
