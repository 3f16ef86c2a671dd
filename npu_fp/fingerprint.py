"""The fingerprint stage: read -> map roles -> plan -> compute -> gather -> signature.

Every rank reads the headers and builds the same plan (a pure function), computes the moments of its
own work items into its own slots of one fixed-schema float64 table, and a single reduce brings the
table to rank 0, which merges segments in a fixed order and alone writes the outputs.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

import npu_fp
from npu_fp.activations import ActivationResult, run_activations
from npu_fp.arch import map_roles
from npu_fp.arch.base import RoleMap, TensorRole
from npu_fp.config import RunConfig
from npu_fp.dist import (
    DistContext,
    main_raises_everywhere,
    reduce_rows_to_main,
)
from npu_fp.io import rundir
from npu_fp.io.reader import FileCache, RowReader, scale_for
from npu_fp.io.safetensors_header import CheckpointError, TensorRef
from npu_fp.io.source import ModelSource, open_model
from npu_fp.io.stamp import FileStamp, folder_stamps, stamped_files
from npu_fp.io.validate import InputError
from npu_fp.plan import Plan, format_plan, make_plan
from npu_fp.progress import Progress
from npu_fp.signature import Signature, build_signature
from npu_fp.stats import partials
from npu_fp.stats.aggregate import TensorStats
from npu_fp.stats.kernel import MomentKernel, item_stats, kernel_threads
from npu_fp.stats.moments import FIELDS, NUM_FIELDS, Moments

log = logging.getLogger(__name__)

# columns of the reduced table: the moment fields of Moments.to_row(), then the four digest words
DIGEST_COLUMNS = slice(FIELDS.index("h0"), FIELDS.index("h3") + 1)
MOMENT_COLUMNS = slice(0, DIGEST_COLUMNS.start)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each work item's rows live in the reduced table: slot of the whole, then its parts."""

    plan: Plan
    first_slot: tuple[int, ...]
    num_slots: int

    def span(self, item: int) -> slice:
        """The table rows of work item `item`: its whole, then its parts."""
        end = self.first_slot[item + 1] if item + 1 < len(self.first_slot) else self.num_slots
        return slice(self.first_slot[item], end)


def computed_tensors(source: ModelSource, rolemap: RoleMap) -> tuple[list[TensorRef], list[str]]:
    """Tensors that get statistics, and those skipped (non-weights: masks, rotary caches, scales)."""
    keep, skipped = [], []
    for name, ref in source.tensors.items():
        role = rolemap.roles.get(name)
        if role is not None and role.kind in ("aux", "scale"):
            skipped.append(name)
        else:
            keep.append(ref)
    return keep, skipped


def build_layout(plan: Plan, roles: dict[str, TensorRole]) -> Layout:
    first, slot = [], 0
    for it in plan.items:
        first.append(slot)
        role = roles.get(it.tensor)
        slot += 1 + (len(role.parts) if role is not None else 0)
    return Layout(plan, tuple(first), slot)


def check_expectations(cfg: RunConfig, source: ModelSource, rolemap: RoleMap) -> None:
    exp = cfg.model
    if exp.expect_arch and exp.expect_arch not in (
        source.architecture,
        source.config.get("model_type"),
    ):
        raise CheckpointError(
            f"{source.root}: preset expects architecture {exp.expect_arch!r} but config.json says "
            f"{source.architecture!r}; wrong model.path or wrong preset?"
        )
    if exp.expect_layers is not None and exp.expect_layers != rolemap.num_layers:
        raise CheckpointError(
            f"{source.root}: preset expects {exp.expect_layers} layers, config.json has "
            f"{rolemap.num_layers}"
        )


def stats_sizes(cfg: RunConfig, ctx: DistContext) -> tuple[int, int]:
    """(chunk elements, read bytes): the config's, or the defaults of the device in use."""
    return (
        cfg.stats.chunk_elems or ctx.device.chunk_elems,
        cfg.stats.read_bytes or ctx.device.read_bytes,
    )


def digest_words(digest: bytes) -> list[float]:
    """A 128-bit digest as four 32-bit words: exact in float64, so it travels in the table."""
    return [float(int.from_bytes(digest[i : i + 4], "big")) for i in range(0, 16, 4)]


def words_digest(words: list[float]) -> bytes:
    return b"".join(int(w).to_bytes(4, "big") for w in words)


def compute_table(
    ctx: DistContext,
    cfg: RunConfig,
    source: ModelSource,
    rolemap: RoleMap,
    layout: Layout,
    store: partials.PartialStore | None = None,
) -> torch.Tensor:
    """This rank's slots of the table: moments of whole and parts, digest of each segment.

    Items an earlier, interrupted run finished (valid records in `store`) are taken as they are;
    every item computed here is recorded there before the next one starts."""
    table = torch.zeros(layout.num_slots, NUM_FIELDS, dtype=torch.float64)
    mine = layout.plan.assignment[ctx.rank]
    done = store.load() if store is not None else {}
    reused = 0
    chunk_elems, read_bytes = stats_sizes(cfg, ctx)
    kernel = MomentKernel(ctx.device, chunk_elems)
    my_bytes = sum(layout.plan.items[i].nbytes for i in mine)
    progress = Progress(
        my_bytes * ctx.world_size,
        enabled=cfg.progress and ctx.is_main,
        label=Path(source.root).name,
    )
    with FileCache() as files, kernel_threads(ctx.device):
        reader = RowReader(files)
        for i in mine:
            item = layout.plan.items[i]
            span = layout.span(i)
            if i in done and done[i].shape == table[span].shape:
                table[span] = done[i]
                reused += 1
                progress.advance(item.nbytes * ctx.world_size)
                continue
            ref = source.tensors[item.tensor]
            role = rolemap.roles.get(item.tensor)
            scale = scale_for(source.tensors, ref)
            res = item_stats(reader, kernel, ref, role, item, read_bytes, scale)
            slot = layout.first_slot[i]
            table[slot, MOMENT_COLUMNS] = torch.tensor(res.whole.to_row(), dtype=torch.float64)
            table[slot, DIGEST_COLUMNS] = torch.tensor(
                digest_words(res.digest), dtype=torch.float64
            )
            for j, pm in enumerate(res.parts):
                table[slot + 1 + j, MOMENT_COLUMNS] = torch.tensor(pm.to_row(), dtype=torch.float64)
            if store is not None:
                store.save(i, table[span])
            progress.advance(item.nbytes * ctx.world_size)
    progress.close()
    log.info(
        "rank %d: %d work items reused from partials, %d computed",
        ctx.rank,
        reused,
        len(mine) - reused,
    )
    return table


def partials_inputs(
    cfg: RunConfig,
    ctx: DistContext,
    source: ModelSource,
    stamps: dict[str, FileStamp],
    layout: Layout,
) -> dict:
    """Everything that shapes a work item's numbers: what seals its partial result."""
    chunk_elems, read_bytes = stats_sizes(cfg, ctx)
    return {
        "npu_fp": npu_fp.__version__,
        "fields": list(FIELDS),
        "files": stamped_files(source.files, stamps),
        "config_sha256": source.config_sha256,
        "lm_prefix": cfg.model.lm_prefix,
        "segment_bytes": cfg.plan.segment_bytes,
        "expert_groups": cfg.plan.expert_groups,
        "chunk_elems": chunk_elems,
        "read_bytes": read_bytes,
        "device_type": ctx.device.type,
        "items": [
            [
                it.tensor,
                it.segment,
                it.row_begin,
                it.row_end,
                layout.span(i).stop - layout.span(i).start,
            ]
            for i, it in enumerate(layout.plan.items)
        ],
    }


def finish_stats(
    layout: Layout, table: torch.Tensor, source: ModelSource, rolemap: RoleMap
) -> list[TensorStats]:
    """Rank 0: merge segments in order into one TensorStats per tensor and per fused part."""
    rows = table.tolist()
    merged: dict[str, list[Moments]] = {}
    seg_digests: dict[str, list[bytes]] = {}
    for i, item in enumerate(layout.plan.items):
        role = rolemap.roles.get(item.tensor)
        nparts = len(role.parts) if role is not None else 0
        slot = layout.first_slot[i]
        acc = merged.setdefault(item.tensor, [Moments() for _ in range(1 + nparts)])
        for j in range(1 + nparts):
            acc[j].merge(Moments.from_row(rows[slot + j]))
        seg_digests.setdefault(item.tensor, []).append(words_digest(rows[slot][DIGEST_COLUMNS]))
    out = []
    for name, acc in merged.items():
        ref = source.tensors[name]
        counted = acc[0].n + acc[0].nan + acc[0].inf
        assert counted == ref.numel, f"{name}: {counted} of {ref.numel} elements reduced"
        role = rolemap.roles.get(name) or TensorRole(name=name, role="other")
        segs = seg_digests[name]
        digest = segs[0] if len(segs) == 1 else xxhash.xxh3_128(b"".join(segs)).digest()
        out.append(TensorStats(ref, role, None, role.role, acc[0], digest.hex()))
        for spec, m in zip(role.parts, acc[1:], strict=True):
            out.append(TensorStats(ref, role, spec.part, spec.role, m, None))
    return out


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """One model's fingerprint on rank 0: the sealed signature, its activation norms (when
    `activations.enabled`), and how long it took."""

    signature: Signature
    activations: ActivationResult | None
    total_bytes: int
    seconds: float
    stream_seconds: float


# Writes a fingerprint's output files into a folder (the command layer supplies it: the figures
# and CSVs belong to npu_fp.report, above this stage)
WriteOutputs = Callable[["Fingerprint", Path], object]


def fingerprint_model(
    ctx: DistContext,
    cfg: RunConfig,
    model_path: str,
    out_dir: Path,
    write: WriteOutputs,
    name: str | None = None,
) -> Fingerprint | None:
    """Collective over all ranks. Rank 0 holds `out_dir`, resumes from the partial results an
    interrupted run left there, and commits `write`'s files as one set; it returns the
    Fingerprint, other ranks and dry runs None."""
    t0 = time.perf_counter()
    source = open_model(model_path)
    shapes = {n: r.shape for n, r in source.tensors.items()}
    rolemap = map_roles(source.config, shapes, cfg.model.lm_prefix)
    check_expectations(cfg, source, rolemap)
    refs, skipped = computed_tensors(source, rolemap)
    world = cfg.world_size if cfg.dry_run and cfg.world_size else ctx.world_size
    plan = make_plan(refs, rolemap.roles, world, cfg.plan.segment_bytes, cfg.plan.expert_groups)
    if cfg.dry_run:
        if ctx.is_main:
            print(
                f"{source.root} ({source.architecture}, adapter {rolemap.arch}, "
                f"{rolemap.num_layers} layers, {rolemap.num_experts} experts)"
            )
            print(format_plan(plan, sum(r.nbytes for r in refs)))
        return None
    layout = build_layout(plan, rolemap.roles)
    # rank 0 owns the run directory for the whole run; every rank learns if it cannot
    with rundir.claimed(out_dir, ctx.is_main, lambda e: main_raises_everywhere(ctx, e)):
        return _compute_and_write(
            ctx, cfg, source, rolemap, layout, skipped, out_dir, write, name, t0
        )


def _compute_and_write(
    ctx: DistContext,
    cfg: RunConfig,
    source: ModelSource,
    rolemap: RoleMap,
    layout: Layout,
    skipped: list[str],
    out_dir: Path,
    write: WriteOutputs,
    name: str | None,
    t0: float,
) -> Fingerprint | None:
    error: BaseException | None = None
    table = torch.zeros(layout.num_slots, NUM_FIELDS, dtype=torch.float64)
    t_compute = time.perf_counter()
    stamps: dict[str, FileStamp] = {}
    try:
        stamps = folder_stamps(source.root, [f.name for f in source.files])
        key = partials.inputs_key(partials_inputs(cfg, ctx, source, stamps, layout))
        if ctx.is_main:
            partials.drop_other_runs(out_dir, key)
        store = partials.PartialStore(out_dir, key, ctx.rank)
        try:
            table = compute_table(ctx, cfg, source, rolemap, layout, store)
        finally:
            store.close()
    except (CheckpointError, InputError, OSError, RuntimeError) as e:
        log.error("rank %d failed: %s", ctx.rank, e)
        error = e
    main_raises_everywhere(ctx, error)
    log.info(
        "rank %d computed %d bytes in %.2f s; peak RSS %.0f MiB",
        ctx.rank,
        sum(layout.plan.bytes_per_rank()[ctx.rank : ctx.rank + 1]),
        time.perf_counter() - t0,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    table = reduce_rows_to_main(ctx, table)
    t_compute = time.perf_counter() - t_compute
    act = None
    if cfg.activations.enabled:  # collective too: every rank takes part before rank 0 writes
        act = run_activations(ctx, cfg.activations, source.root, source)
    if not ctx.is_main:
        return None
    stats = finish_stats(layout, table, source, rolemap)
    model_name = name or cfg.model.name or Path(source.root).name
    if Path(source.root).parent.name == "snapshots" and not (name or cfg.model.name):
        model_name = Path(source.root).parent.parent.name.removeprefix("models--")
    settings = {
        "segment_bytes": cfg.plan.segment_bytes,
        "chunk_elems": stats_sizes(cfg, ctx)[0],
        "device_type": ctx.device.type,
    }
    activations = None
    if act is not None:
        activations = {"rows": act.rows, "routing": act.routing, "settings": act.settings}
    # size, mtime and sampled bytes bind the signature to the bytes it describes (io/stamp.py)
    files = stamped_files(source.files, stamps)
    sig = build_signature(source, rolemap, stats, skipped, model_name, settings, files, activations)
    fp = Fingerprint(sig, act, source.total_bytes, time.perf_counter() - t0, t_compute)
    # the output set is staged and committed whole, its manifest last (io/rundir.py)
    with rundir.staged_outputs(out_dir) as stage:
        write(fp, stage)
    partials.drop_all(out_dir)
    return fp
