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


# Hydra flags followed by a value (which is not a command word)
HYDRA_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cn", "--config-name", "-cp",
                     "--config-path", "-cd", "--config-dir", "--info", "--experimental-rerun"}


def cli() -> None:
    argv = sys.argv[1:]
    extra = []
    for i, arg in enumerate(argv):
        if arg.startswith("-") or "=" in arg or (i and argv[i - 1] in HYDRA_VALUE_FLAGS):
            continue
        if arg not in COMMANDS:
            print(f"npu-fp: error: unknown command {arg!r}; expected one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            sys.exit(2)
        del argv[i]
        extra.append(f"command={arg}")
        break
    if "RANK" in os.environ and not any(a.startswith("hydra.run.dir=") for a in argv):
        # every rank would resolve ${now:...} on its own and could land in another second: derive
        # one directory from what torchrun gives all ranks alike
        run_id = "-".join(os.environ.get(k, "x") for k in
                          ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if os.environ.get("RANK", "0") != "0":
        # only rank 0 records Hydra's config in the shared run directory
        extra.append("hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv, *extra]
    _hydra_main()


if __name__ == "__main__":
    cli()
