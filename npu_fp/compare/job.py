"""The comparison stage of `npu-fp compare`: fingerprint what is missing, test every pair, and
assemble the report document (npu_fp.report writes it).

Phases, each sharded over ranks by estimated bytes (greedy, deterministic) and gathered to rank 0:
  A. per pair: vocabulary alignment of the residual streams (+ untied head test);
  B. per pair, model and layer: attention sketches -> rank 0 builds the layer x layer matrix and the
     monotone layer matching;
  C. per matched layer pair: in-place, unit-matching, head and expert tests on full tensors.
No item depends on the rank or the world size, so 1 and N ranks give the same verdicts.
"""

from __future__ import annotations

import logging
import resource
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from npu_fp.arch.base import ATTENTION
from npu_fp.compare.assemble import assemble
from npu_fp.compare.inputs import Entry, FingerprintFn, resolve_entries
from npu_fp.compare.pairwork import Prep, layer_pair, layer_sketch, prepare
from npu_fp.compare.profiles import load_bank
from npu_fp.compare.tensors import ModelView, open_view
from npu_fp.compare.units import monotone_match, sketch_z
from npu_fp.config import RunConfig
from npu_fp.dist import (
    DistContext,
    broadcast_object,
    gather_objects_to_main,
    main_raises_everywhere,
)
from npu_fp.io.safetensors_header import CheckpointError
from npu_fp.plan import longest_first
from npu_fp.progress import Progress
from npu_fp.signature import load_signature

log = logging.getLogger(__name__)


class _Views:
    """Model views opened lazily, once per rank."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self._v = cfg, {}

    def __call__(self, path: str) -> ModelView:
        if path not in self._v:
            self._v[path] = open_view(path, self.cfg.model.lm_prefix)
        return self._v[path]

    def close(self) -> None:
        for v in self._v.values():
            v.close()


def _run_phase(
    ctx: DistContext,
    items: list[Any],
    costs: list[int],
    fn,
    label: str,
    phases: dict[str, float],
    progress: bool,
) -> dict | None:
    """Run this rank's share of `items`; rank 0 gets {item: result} for all of them.

    Costs are bytes read; rank 0 shows its share (scaled to the whole phase) as a progress bar
    and `phases[label]` gets the phase's seconds on this rank (gather included)."""
    t0 = time.perf_counter()
    mine = longest_first(costs, ctx.world_size)[ctx.rank] if items else []
    bar = Progress(
        sum(costs[i] for i in mine) * ctx.world_size,
        enabled=progress and ctx.is_main,
        label=f"compare {label}",
    )
    results, error = {}, None
    try:
        for i in mine:
            results[items[i]] = fn(items[i])
            bar.advance(costs[i] * ctx.world_size)
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:
        log.exception("rank %d failed in phase %s", ctx.rank, label)
        error = e
    finally:
        bar.close()
    main_raises_everywhere(ctx, error)
    gathered = gather_objects_to_main(ctx, results)
    phases[label] = round(time.perf_counter() - t0, 3)
    log.info("phase %s: %d items, %.2f s on rank %d", label, len(mine), phases[label], ctx.rank)
    if gathered is None:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    assert len(merged) == len(items), "every item must be computed exactly once"
    return merged


def canonical_pairs(entries: list[Entry]) -> list[tuple[int, int]]:
    """Every pair once, its two sides in an order fixed by the models' content (content hash,
    then name), not by the order they were given: compare(A, B) and compare(B, A) run the same
    computation and give the same verdict and p-value (the report lists `a` and `b` in this
    order)."""
    keys = [
        (str(load_signature(e.signature_path).identity.get("content_hash") or ""), e.name)
        for e in entries
    ]
    return [
        (i, j) if keys[i] <= keys[j] else (j, i) for i, j in combinations(range(len(entries)), 2)
    ]


def _blocked(a: Entry, b: Entry) -> str | None:
    if a.signature_path == b.signature_path or (a.weights and a.weights == b.weights):
        return (
            f"self-comparison: {a.name} and {b.name} are the same model "
            f"({a.weights or a.signature_path}); lineage is not tested against itself"
        )
    return None


def compare_models(
    ctx: DistContext,
    cfg: RunConfig,
    models: list[str],
    signatures: list[str],
    out_dir: Path,
    fingerprint: FingerprintFn | None = None,
    names: list[str] | None = None,
    only: set[frozenset[str]] | None = None,
) -> dict | None:
    """Collective: compare every pair; rank 0 returns the report document, the others None.

    Models without a cached signature (under `compare.cache_dir`, default `out_dir/signatures`)
    are fingerprinted with `fingerprint`; signatures are used as they are."""
    t_start = time.perf_counter()
    cc = cfg.compare
    device = ctx.device.torch
    # a bad bank folder fails here, on every rank, before any work
    bank = load_bank(cc.bank) if cc.bank else None
    entries = resolve_entries(ctx, cfg, models, signatures, out_dir, fingerprint, names)
    t_fp = time.perf_counter() - t_start
    pairs = canonical_pairs(entries)
    if only is not None:  # a labelled benchmark asks for some pairs, not all N^2 / 2
        pairs = [(i, j) for i, j in pairs if frozenset((entries[i].name, entries[j].name)) in only]
    views = _Views(cfg)
    phases: dict[str, float] = {}
    weighted = [
        k
        for k, (i, j) in enumerate(pairs)
        if entries[i].weights and entries[j].weights and not _blocked(entries[i], entries[j])
    ]
    try:

        def emb_cost(k: int) -> int:
            i, j = pairs[k]
            return sum(views(entries[x].weights).nbytes(None, "embed.tok") for x in (i, j))

        def do_prep(k: int) -> Prep:
            i, j = pairs[k]
            return prepare(views(entries[i].weights), views(entries[j].weights), cc, device)

        preps = _run_phase(
            ctx, weighted, [emb_cost(k) for k in weighted], do_prep, "align", phases, cfg.progress
        )
        preps = broadcast_object(ctx, preps)
        sk_items = [
            (k, side, layer)
            for k in weighted
            if preps[k].residual is not None
            for side, e in (("a", pairs[k][0]), ("b", pairs[k][1]))
            for layer in range(views(entries[e].weights).num_layers)
        ]

        def view_of(k: int, side: str) -> ModelView:
            return views(entries[pairs[k][0 if side == "a" else 1]].weights)

        def sk_cost(item: tuple) -> int:
            k, side, layer = item
            return sum(view_of(k, side).nbytes(layer, r) for r in ATTENTION)

        def do_sketch(item: tuple) -> dict:
            k, side, layer = item
            return layer_sketch(
                view_of(k, side), layer, preps[k].residual, side, device, cc.sketch_dim
            )

        sketches = _run_phase(
            ctx, sk_items, [sk_cost(x) for x in sk_items], do_sketch, "sketch", phases, cfg.progress
        )
        matching, error = None, None
        if ctx.is_main:
            try:
                matching = _layer_matching(sketches, weighted, pairs, entries, views)
            except (ValueError, RuntimeError) as e:  # never leave the other ranks waiting
                error = e
        main_raises_everywhere(ctx, error)
        matching = broadcast_object(ctx, matching)
        lp_items = [
            (k, la, lb, matching[k]["diagonal"]) for k in matching for la, lb in matching[k]["path"]
        ]

        def lp_cost(item: tuple) -> int:
            k, la, lb, _ = item
            return view_of(k, "a").layer_bytes(la) + view_of(k, "b").layer_bytes(lb)

        def do_layer(item: tuple) -> dict:
            k, la, lb, diag = item
            return layer_pair(view_of(k, "a"), view_of(k, "b"), la, lb, preps[k], cc, device, diag)

        layer_results = _run_phase(
            ctx, lp_items, [lp_cost(x) for x in lp_items], do_layer, "layers", phases, cfg.progress
        )
    finally:
        views.close()
    log.info(
        "rank %d: compare peak RSS %.0f MiB",
        ctx.rank,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if not ctx.is_main:
        return None
    timing = {
        "fingerprint_s": round(t_fp, 3),
        "pairwise_s": round(time.perf_counter() - t_start - t_fp, 3),
        "phases_s": phases,  # align, sketch, layers: seconds on rank 0, gathers included
        "world_size": ctx.world_size,
        "device": ctx.device.type,
    }
    return assemble(cfg, entries, pairs, preps, matching, layer_results, _blocked, timing, bank)


def _layer_matching(
    sketches: dict | None, weighted: list[int], pairs: list, entries: list[Entry], views: _Views
) -> dict[int, dict]:
    """Rank 0: layer x layer z matrix and the monotone matching per pair."""
    assert sketches is not None
    out: dict[int, dict] = {}
    for k in weighted:
        i, j = pairs[k]
        la_n, lb_n = views(entries[i].weights).num_layers, views(entries[j].weights).num_layers
        if (k, "a", 0) not in sketches and la_n:
            continue  # no residual map: no layer tests for this pair
        z = np.zeros((la_n, lb_n))
        have = False
        for la in range(la_n):
            for lb in range(lb_n):
                v = sketch_z(sketches[(k, "a", la)], sketches[(k, "b", lb)])
                if v is not None:
                    z[la, lb], have = v, True
        diagonal = la_n == lb_n
        path = [(x, x) for x in range(la_n)] if diagonal else (monotone_match(z) if have else [])
        out[k] = {
            "z": z if have else None,
            "path": path,
            "diagonal": diagonal,
            "dp_path": monotone_match(z) if have else [],
        }
    return out
