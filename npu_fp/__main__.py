"""Entry point: `npu-fp <command> [hydra overrides]` and `python -m npu_fp <command> ...`.

The command word (fingerprint | compare | activations) becomes the `command=` override; Hydra
composes the config, which is converted once to dataclasses and handed to plain functions.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch: see device.py

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from npu_fp.config import COMMANDS, RunConfig, register_configs, to_run_config  # noqa: E402

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


def cli() -> None:
    argv = sys.argv[1:]
    extra = []
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        cmd = argv.pop(0)
        if cmd not in COMMANDS:
            print(f"npu-fp: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            sys.exit(2)
        extra.append(f"command={cmd}")
    if os.environ.get("RANK", "0") != "0":
        # one run directory for all ranks; only rank 0 records Hydra's config there
        extra.append("hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv, *extra]
    _hydra_main()


if __name__ == "__main__":
    cli()
