"""What the command line adds around Hydra: the help text, `--version`, and arguments checked
before Hydra composes them: overrides against the schema (a misspelt key gets the closest real
keys and exit status 2, where Hydra exits 1 without a hint) and the run directory.
"""

from __future__ import annotations

import difflib
import enum
import os
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import npu_fp
from npu_fp.config import RunConfig, schema_keys
from npu_fp.io.rundir import held_by, locked_message

# one line and one example per command, in the order `--help` lists them
COMMAND_HELP = {
    "demo": (
        "fingerprint the embedded demo zoo and compare it (the default command)",
        "npu-fp demo hydra.run.dir=out/demo",
    ),
    "fingerprint": (
        "fingerprint one model folder into signature.json, tensors.csv, profile.png",
        "npu-fp fingerprint model.path=/models/Qwen2.5-14B hydra.run.dir=out/qwen",
    ),
    "compare": (
        "lineage verdicts for every pair of models and / or signatures",
        "npu-fp compare compare.models=[/models/A,/models/B] hydra.run.dir=out/cmp",
    ),
    "activations": (
        "per-layer activation norms (layer-streamed forward)",
        "npu-fp activations model.path=DIR hydra.run.dir=out/act",
    ),
    "benchmark": (
        "accuracy on a manifest of labelled model pairs",
        "npu-fp benchmark benchmark.pairs=examples/manifests/awm.json",
    ),
}

MAIN_OVERRIDES = (
    ("model=PRESET | model.path=DIR", "the model (a folder, sharded folder or HF cache folder)"),
    ("device=auto|cpu|cuda|npu", "where the statistics run (auto: cuda, then npu, then cpu)"),
    ("hydra.run.dir=OUT", "output folder (default outputs/<date>/<time>)"),
    ("plan.segment_bytes=N", "row-segment grid in bytes (default 64 MiB)"),
    ("plan.expert_groups=true", "keep each MoE expert group on one rank"),
    ("dry_run=true world_size=N", "print the plan for N ranks, read no tensor"),
    ("progress=false", "no progress bar"),
)

# the schema sections each command reads, besides the top-level keys
COMMAND_SECTIONS = {
    "demo": ("plan", "stats", "compare", "dist"),
    "fingerprint": ("model", "plan", "stats", "activations", "dist"),
    "compare": ("compare", "model", "plan", "stats", "dist"),
    "activations": ("model", "activations", "dist"),
    "benchmark": ("benchmark", "compare", "plan", "stats", "dist"),
}

# config groups holding presets (conf/<group>/<name>.yaml): `group=name` selects one
PRESET_GROUPS = ("model", "device", "activations")


def version_text() -> str:
    return f"npu-fp {npu_fp.__version__}"


def _defaults(node: type = RunConfig, prefix: str = "") -> dict[str, tuple[object, object]]:
    """dotted key -> (type, default) over the schema."""
    hints = typing.get_type_hints(node)
    out: dict[str, tuple[object, object]] = {}
    for f in fields(node):
        key = f"{prefix}{f.name}"
        factory = f.default_factory
        if is_dataclass(factory):
            out.update(_defaults(factory, key + "."))  # type: ignore[arg-type]
        else:
            default = factory() if factory is not MISSING else f.default
            out[key] = (hints[f.name], default)
    return out


def _type_name(kind: object) -> str:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "|".join(str(c.value) for c in kind)
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")


def conf_dir() -> Path:
    """The presets: `npu_fp/conf` in a wheel, `conf/` at the top of a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"  # wheels carry conf/ as the npu_fp.conf package
    return installed if installed.is_dir() else here.parent / "conf"


def _presets() -> list[str]:
    return [f"  {g}: {', '.join(preset_names(conf_dir(), g))}" for g in PRESET_GROUPS]


def _template(lines: list[str]) -> str:
    """Hydra reads the help as a string.Template: dollar signs are escaped."""
    return "\n".join(lines).replace("$", "$$")


def help_text() -> str:
    """`npu-fp --help`: the commands with one example each and the main overrides."""
    lines = [f"{version_text()}: was model X derived from model Y?", ""]
    lines += ["usage: npu-fp [COMMAND] [KEY=VALUE ...]   (npu-fp COMMAND --help: its knobs)", ""]
    lines += ["commands:"]
    for name, (what, example) in COMMAND_HELP.items():
        lines += [f"  {name:<12} {what}", f"  {'':<12}   {example}"]
    lines += ["", "main overrides:"]
    lines += [f"  {k:<30} {v}" for k, v in MAIN_OVERRIDES]
    lines += ["", "presets (GROUP=NAME):", *_presets()]
    lines += [
        "",
        "more: npu-fp --version; npu-fp COMMAND --cfg job (the composed config); "
        "torchrun --nproc_per_node=N --no-python npu-fp COMMAND ...",
    ]
    return _template(lines)


def command_help(command: str) -> str:
    """`npu-fp COMMAND --help`: the command's example and every knob it reads, with defaults."""
    what, example = COMMAND_HELP[command]
    lines = [f"npu-fp {command}: {what}", f"  {example}", "", "knobs (KEY=VALUE, default shown):"]
    sections = COMMAND_SECTIONS[command]
    for key, (kind, default) in _defaults().items():
        section = key.split(".")[0] if "." in key else None
        if key in ("command", "out_dir") or (section is not None and section not in sections):
            continue
        shown = "null" if default is None else str(default)
        lines.append(f"  {key}={shown}  ({_type_name(kind)})")
    lines += ["", "presets (GROUP=NAME):", *_presets()]
    return _template(lines)


def render_help(command: object) -> str:
    """The OmegaConf resolver behind Hydra's help template (conf/hydra/help/npu_fp.yaml)."""
    name = str(command)
    return command_help(name) if name in COMMAND_HELP and name != "demo" else help_text()


def preset_names(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.endswith("_"))


def check_overrides(overrides: list[str], conf_dir: Path) -> str | None:
    """Why an override cannot work (unknown key with the closest keys, unknown preset or choice),
    or None. Hydra's own keys and sweeps over values are left to Hydra."""
    keys = schema_keys()
    # a whole section set at once (`stats={chunk_elems:1}`) is a key too
    sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    defaults = _defaults()
    for arg in overrides:
        if "=" not in arg or arg.startswith("-"):  # Hydra's own flags (--config-dir=DIR, ...)
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key in PRESET_GROUPS:
            names = preset_names(conf_dir, key)
            for v in value.split(","):  # a multirun sweeps over presets
                if v and v not in names:
                    return f"{arg}: no {key} preset {v!r}; expected one of {', '.join(names)}"
            continue
        if key not in keys and key not in sections:
            leaf = key.rsplit(".", 1)[-1]
            same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # models: compare.models
            close = difflib.get_close_matches(key, [*keys, *PRESET_GROUPS], n=3, cutoff=0.6)
            close = list(dict.fromkeys([*same_leaf, *close]))[:3]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return f"{arg}: unknown key {key!r}{hint} (npu-fp --help lists the keys)"
        kind = defaults[key][0] if key in defaults else None
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = [str(c.value) for c in kind]
            for v in value.split(","):
                if v not in choices:
                    return f"{arg}: {key} must be one of {', '.join(choices)}, got {v!r}"
    return None


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
