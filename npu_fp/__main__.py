"""Entry point: `npu-fp <command> [hydra overrides]` and `python -m npu_fp <command> ...`.

The command word (demo | fingerprint | compare | activations | benchmark) becomes the `command=` override; Hydra
composes the config, which is converted once to dataclasses and handed to npu_fp.commands.
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

import difflib  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from npu_fp.cli import (  # noqa: E402
    HYDRA_VALUE_FLAGS,
    check_overrides,
    check_run_dir,
    conf_dir,
    render_help,
    version_text,
)
from npu_fp.commands import run  # noqa: E402
from npu_fp.config import COMMANDS, register_configs, to_run_config  # noqa: E402

log = logging.getLogger("npu_fp")


register_configs()
if not OmegaConf.has_resolver("npu_fp_help"):  # the help template (conf/hydra/help/npu_fp.yaml)
    OmegaConf.register_new_resolver("npu_fp_help", render_help)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="npu_fp")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        run(to_run_config(dcfg))
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


def fail(message: str) -> None:
    print(f"npu-fp: error: {message}", file=sys.stderr)
    sys.exit(2)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (torchrun stopping the other ranks, a scheduler) unwinds like Ctrl-C, so every
    `finally` runs: staging removed, locks released, partial results closed."""
    raise KeyboardInterrupt


def cli() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:]
    if "--version" in argv or "-V" in argv:
        print(version_text())
        return
    extra = []
    for i, arg in enumerate(argv):
        if arg.startswith("-") or "=" in arg or (i and argv[i - 1] in HYDRA_VALUE_FLAGS):
            continue
        if arg not in COMMANDS:
            close = difflib.get_close_matches(arg, COMMANDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            fail(f"unknown command {arg!r}{hint} (expected one of {', '.join(COMMANDS)})")
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
    why = check_overrides(argv, conf_dir()) or check_run_dir([*argv, *extra])
    if why:
        fail(why)
    sys.argv = [sys.argv[0], *argv, *extra]
    _hydra_main()


if __name__ == "__main__":
    cli()
