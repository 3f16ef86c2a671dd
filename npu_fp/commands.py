"""The commands: `fingerprint`, `compare`, `activations`, `benchmark` and `demo`.

This is the top of the import graph: each command opens the distributed context, sets up the
per-rank logs, calls the library stages below (fingerprint, compare, activations) and writes their
results with npu_fp.report. Nothing below imports this module; tests call these functions directly
with a RunConfig, without Hydra.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from npu_fp import zoo
from npu_fp.activations import run_activations
from npu_fp.compare.job import compare_models
from npu_fp.config import RunConfig
from npu_fp.dist import DistContext, barrier, distributed, main_raises_everywhere
from npu_fp.fingerprint import Fingerprint, fingerprint_model
from npu_fp.io import rundir
from npu_fp.io.atomic import write_text_atomic
from npu_fp.io.source import open_model
from npu_fp.lineage_bench import evaluate, load_manifest, render, summary_line
from npu_fp.logs import setup_rank_logging
from npu_fp.report import activation_report, profile_plot
from npu_fp.report.compare_report import verdict_summary, write_report
from npu_fp.signature import Signature, tensors_csv, write_signature

log = logging.getLogger(__name__)


def write_fingerprint(fp: Fingerprint, out_dir: Path) -> Path:
    """A fingerprint's output files (written into the run directory's staging folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fp.activations is not None:
        activation_report.write_activation_outputs(fp.activations, out_dir)
    write_text_atomic(out_dir / "tensors.csv", tensors_csv(fp.signature.tensors))
    profile_plot.plot_profiles([fp.signature], out_dir / "profile.png")
    return write_signature(fp.signature.doc, out_dir)


def fingerprint_into(
    ctx: DistContext, cfg: RunConfig, model_path: str, out_dir: Path, name: str | None = None
) -> Signature | None:
    """Collective: fingerprint one model; rank 0 writes its outputs under `out_dir` and returns
    the signature (with its path), other ranks and dry runs None."""
    fp = fingerprint_model(ctx, cfg, model_path, out_dir, write_fingerprint, name)
    if fp is None:
        return None
    path = out_dir / "signature.json"
    sig = fp.signature
    log.info(
        "%s: %.3f GiB in %.2f s (%.2f GB/s) -> %s; job: bytes=%d seconds=%.3f stream_seconds=%.3f",
        sig.name,
        fp.total_bytes / 2**30,
        fp.seconds,
        fp.total_bytes / 1e9 / max(fp.seconds, 1e-9),
        out_dir,
        fp.total_bytes,
        fp.seconds,
        fp.stream_seconds,
    )
    return Signature(sig.doc, str(path))


def _demo_targets(ctx: DistContext, cfg: RunConfig, out: Path) -> list[tuple[str, Path, str]]:
    zoo_dir = Path(cfg.zoo_dir) if cfg.zoo_dir else zoo.default_zoo_dir()
    if ctx.is_main:
        zoo.build_demo_zoo(zoo_dir)
    barrier(ctx)
    return [(str(zoo_dir / n), out / n, n) for n in zoo.DEMO_MODELS]


def _fingerprint_all(
    ctx: DistContext, cfg: RunConfig, targets: list[tuple[str, Path, str | None]]
) -> list[Path]:
    written = []
    for path, target_dir, name in targets:
        sig = fingerprint_into(ctx, cfg, path, target_dir, name)
        if sig is not None and sig.path:
            written.append(Path(sig.path))
            print(f"signature: {sig.path}")
    return written


def fingerprint(cfg: RunConfig) -> list[Path]:
    """`npu-fp fingerprint`: one model (or each demo model when no model.path is given)."""
    out = Path(cfg.out_dir)
    with distributed(cfg.device, cfg.dist.timeout_s) as ctx:
        setup_rank_logging(out, ctx.rank)
        if cfg.model.path is None:
            return _fingerprint_all(ctx, cfg, _demo_targets(ctx, cfg, out))
        return _fingerprint_all(ctx, cfg, [(cfg.model.path, out, cfg.model.name)])


def _claimed(ctx: DistContext, out: Path) -> AbstractContextManager:
    """Rank 0 holds OUT for the whole run; every rank learns if it cannot (io/rundir.py)."""
    return rundir.claimed(out, ctx.is_main, lambda e: main_raises_everywhere(ctx, e))


def _write_report(doc: dict, out: Path) -> Path:
    """The report's files committed as one set (io/rundir.py)."""
    with rundir.staged_outputs(out) as stage:
        write_report(doc, stage)
    return out / "report.json"


def _compare_and_report(
    ctx: DistContext, cfg: RunConfig, models: list[str], signatures: list[str], out: Path
) -> Path | None:
    with _claimed(ctx, out):
        doc = compare_models(ctx, cfg, models, signatures, out, fingerprint=fingerprint_into)
        if doc is None:
            return None
        path = _write_report(doc, out)
    print(verdict_summary(path))
    return path


def demo(cfg: RunConfig) -> list[Path]:
    """`npu-fp demo` (and `npu-fp` alone): fingerprint the demo zoo, then compare it under
    OUT/compare. Given a model.path (`npu-fp model.path=DIR`), the fingerprint command."""
    if cfg.model.path is not None:  # `npu-fp model.path=DIR` fingerprints DIR, as it always did
        return fingerprint(cfg)
    out = Path(cfg.out_dir)
    with distributed(cfg.device, cfg.dist.timeout_s) as ctx:
        setup_rank_logging(out, ctx.rank)
        written = _fingerprint_all(ctx, cfg, _demo_targets(ctx, cfg, out))
        if not cfg.dry_run:
            sigs = [str(out / n / "signature.json") for n in zoo.DEMO_MODELS]
            _compare_and_report(ctx, cfg, [], sigs, out / "compare")
        return written


def compare(cfg: RunConfig) -> Path:
    """`npu-fp compare`: returns OUT/report.json (written by rank 0)."""
    out = Path(cfg.out_dir)
    with distributed(cfg.device, cfg.dist.timeout_s) as ctx:
        setup_rank_logging(out, ctx.rank)
        cc = cfg.compare
        _compare_and_report(ctx, cfg, list(cc.models), list(cc.signatures), out)
    return out / "report.json"


def activations(cfg: RunConfig) -> Path:
    """`npu-fp activations`: one model, outputs in cfg.out_dir (rank 0 writes)."""
    if cfg.model.path is None:
        raise ValueError(
            "npu-fp activations needs model.path=DIR (a checkpoint folder with "
            "config.json, *.safetensors and tokenizer.json)"
        )
    out = Path(cfg.out_dir)
    with distributed(cfg.device, cfg.dist.timeout_s) as ctx:
        setup_rank_logging(out, ctx.rank)
        source = open_model(cfg.model.path)
        with _claimed(ctx, out):
            result = run_activations(ctx, cfg.activations, source.root, source)
            if result is not None:
                with rundir.staged_outputs(out) as stage:
                    paths = activation_report.write_activation_outputs(result, stage)
                log.info("activations: %s", ", ".join(str(out / p.name) for p in paths))
    return out


def benchmark(cfg: RunConfig) -> Path:
    """`npu-fp benchmark`: compare a manifest's labelled pairs, write benchmark.json / .md."""
    manifest = load_manifest(cfg.benchmark.pairs or "", cfg.benchmark.models_dir)
    out = Path(cfg.out_dir)
    ids = [
        m
        for m, path in manifest.models.items()
        if path is not None and any(m in (lp.a, lp.b) for lp in manifest.pairs)
    ]
    names = {m: f"m{k}:{Path(str(manifest.models[m])).name}" for k, m in enumerate(ids)}
    wanted = {
        frozenset((names[lp.a], names[lp.b]))
        for lp in manifest.pairs
        if lp.a in names and lp.b in names
    }
    with distributed(cfg.device, cfg.dist.timeout_s) as ctx:
        setup_rank_logging(out, ctx.rank)
        doc = None
        if wanted:
            with _claimed(ctx, out / "compare"):
                doc = compare_models(
                    ctx,
                    cfg,
                    [str(manifest.models[m]) for m in ids],
                    [],
                    out / "compare",
                    fingerprint=fingerprint_into,
                    names=[names[m] for m in ids],
                    only=wanted,
                )
                if doc is not None:  # the report as written (non-finite numbers as null)
                    doc = json.loads(_write_report(doc, out / "compare").read_text())
        if not ctx.is_main:
            return out / "benchmark.json"
    result = evaluate(doc or {"pairs": []}, manifest, names)
    write_text_atomic(out / "benchmark.md", render(result))
    path = write_text_atomic(
        out / "benchmark.json", json.dumps(result, indent=1, allow_nan=False) + "\n"
    )
    print(summary_line(result, out / "benchmark.md"))
    return path


COMMANDS: dict[str, Callable[[RunConfig], object]] = {
    "demo": demo,
    "fingerprint": fingerprint,
    "compare": compare,
    "activations": activations,
    "benchmark": benchmark,
}


def run(cfg: RunConfig) -> object:
    """Run the command `cfg.command` names."""
    return COMMANDS[cfg.command](cfg)
