"""The units of pairwise work that ranks execute: alignment, layer sketches, layer-pair tests.

Each function depends only on its inputs (never on the rank or the number of ranks), so the job
gets the same numbers from 1 or N ranks. Every read is one tensor of one layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from npu_fp.arch.base import ATTENTION
from npu_fp.compare.align import Residual, align_pair
from npu_fp.compare.exact import degenerate, identity_test
from npu_fp.compare.tensors import ModelView
from npu_fp.compare.units import (
    READERS,
    SALT,
    block_test,
    expert_sketch,
    head_test,
    inplace_test,
    reduce_dims,
    sketch,
    to_units,
)
from npu_fp.config import CompareConfig
from npu_fp.device import bf16_ok

log = logging.getLogger(__name__)

ATTN = ATTENTION
FFN = {"gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}
SHARED = {"gate": "moe.shared.gate", "up": "moe.shared.up", "down": "moe.shared.down"}
EXPERT = {"gate": "moe.expert.gate", "up": "moe.expert.up", "down": "moe.expert.down"}
FFN_ROLES = frozenset((*FFN.values(), *SHARED.values(), *EXPERT.values()))
PREMATCH_CANDIDATES = 4  # dst experts each expert is matched into when the whole pool is too big


@dataclass(frozen=True)
class Prep:
    """What every layer item of a pair needs: the residual map (None: no weight tests)."""

    residual: Residual | None
    align: dict
    head_rows: list[dict]


def prepare(a: ModelView, b: ModelView, cfg: CompareConfig, device: torch.device) -> Prep:
    res, info, head_rows = align_pair(a, b, device, cfg.max_tokens, cfg.seed)
    return Prep(res, info, head_rows)


def layer_sketch(
    view: ModelView, layer: int, res: Residual, side: str, device: torch.device, k: int
) -> dict[str, torch.Tensor]:
    out = {}
    for role in ATTN:
        m = view.read(layer, role)
        if m is not None and m.ndim == 2:
            out[role] = sketch(to_units(m, role, res, side, device), k)
    return out


class _Layer:
    """One layer of one model, each tensor read at most once.

    Attention and router units are kept at full width (head, KV-group and in-place tests use
    them); FFN matrices (dense, shared and routed experts) are projected to `proj_dim` as soon as
    they are read and only the projection is kept, so a MoE layer's experts cost
    units x proj_dim floats each, not their full width, and the dense pool is projected once per
    layer and role instead of once per expert matched into it."""

    def __init__(
        self,
        view: ModelView,
        layer: int,
        res: Residual,
        side: str,
        device: torch.device,
        proj_dim: int,
    ) -> None:
        self.view, self.layer, self.res, self.side, self.device = view, layer, res, side, device
        self.proj_dim = proj_dim
        self._full: dict[tuple[str, int | None], torch.Tensor | None] = {}
        self._proj: dict[tuple[str, int | None], torch.Tensor | None] = {}

    def units(self, role: str, expert: int | None = None) -> torch.Tensor | None:
        """[units, residual'] of one matrix in its stored float dtype (bf16 stays bf16)."""
        key = (role, expert)
        if key in self._full:
            return self._full[key]
        m = self.view.read(self.layer, role, expert, keep_dtype=bf16_ok(self.device))
        ok = m is not None and m.ndim == 2 and _residual_fits(m, role, self.res, self.side)
        x = to_units(m, role, self.res, self.side, self.device) if ok else None
        short = role.rsplit(".", 1)[-1]
        if role in FFN_ROLES:
            self._proj[key] = None if x is None else reduce_dims(x, self.proj_dim, SALT[short])
        else:
            self._full[key] = x
        return x

    def projected(self, role: str, expert: int | None = None) -> torch.Tensor | None:
        """[units, proj_dim] float32 of an FFN matrix (read and projected on first use)."""
        key = (role, expert)
        if key not in self._proj:
            self.units(role, expert)
        return self._proj[key]

    def blocks(self) -> list[tuple[str, int | None, dict[str, str]]]:
        out: list[tuple[str, int | None, dict[str, str]]] = []
        if self.view.has(self.layer, "mlp.gate") or self.view.has(self.layer, "mlp.up"):
            out.append(("mlp", None, FFN))
        if self.view.has(self.layer, "moe.shared.gate") or self.view.has(
            self.layer, "moe.shared.up"
        ):
            out.append(("shared", None, SHARED))
        out += [(f"expert {e}", e, EXPERT) for e in self.view.experts(self.layer)]
        return out

    def block(self, expert: int | None, roles: dict[str, str]) -> dict[str, torch.Tensor]:
        """The block's projected matrices by short name (gate, up, down)."""
        got = {short: self.projected(role, expert) for short, role in roles.items()}
        return {k: v for k, v in got.items() if v is not None}

    def block_units(self, roles: dict[str, str], expert: int | None) -> int | None:
        """Units of one FFN block from the header shapes alone (no read)."""
        for short, role in roles.items():
            shape = self.view.shape(self.layer, role, expert)
            if shape is not None:
                return shape[0] if short != "down" else shape[1]
        return None


def _residual_fits(m: torch.Tensor, role: str, res: Residual, side: str) -> bool:
    dim = m.shape[1] if role in READERS else m.shape[0]
    idx = res.idx_a if side == "a" else res.idx_b
    return bool(idx) and max(idx) < dim


def _heads(view: ModelView) -> tuple[int | None, int | None]:
    cfg = view.source.config
    nh = cfg.get("num_attention_heads")
    nkv = cfg.get("num_key_value_heads", nh)
    return (nh if isinstance(nh, int) else None, nkv if isinstance(nkv, int) else None)


def layer_pair(
    a: ModelView,
    b: ModelView,
    la: int,
    lb: int,
    prep: Prep,
    cfg: CompareConfig,
    device: torch.device,
    diagonal: bool,
) -> dict:
    """All tests between layer `la` of A and layer `lb` of B.

    `diagonal` is False when the pair was chosen by the attention-based layer matching; attention
    tests are then left out, because their data chose the pair (the FFN tests stay valid: under
    the null, FFN weights are independent of attention weights).
    """
    res = prep.residual
    assert res is not None
    A = _Layer(a, la, res, "a", device, cfg.proj_dim)
    B = _Layer(b, lb, res, "b", device, cfg.proj_dim)
    inplace: list[dict] = []
    roles: list[tuple[str, int | None]] = []
    if diagonal:
        roles += [(r, None) for r in ATTN]
    roles += [(r, None) for r in (*FFN.values(), *SHARED.values(), "moe.router")]
    roles += [
        (r, e) for e in sorted(set(a.experts(la)) & set(b.experts(lb))) for r in EXPERT.values()
    ]
    for role, expert in roles:
        if not (a.has(la, role, expert) and b.has(lb, role, expert)):
            continue
        xa, xb = A.units(role, expert), B.units(role, expert)
        if xa is None or xb is None:
            continue
        t = inplace_test(xa, xb)
        if t is not None:
            inplace.append({"role": role, "layer_a": la, "layer_b": lb, "expert": expert, **t})
    blocks = _block_tests(a, b, A, B, la, lb, cfg)
    identity = _identity_tests(a, b, A, B, la, lb, diagonal)
    head = None
    if diagonal:
        (nh_a, nkv_a), (nh_b, nkv_b) = _heads(a), _heads(b)
        if nh_a and nh_a == nh_b and nkv_a == nkv_b:
            qa = {k[-1]: A.units(k) for k in ATTN}
            qb = {k[-1]: B.units(k) for k in ATTN}
            qa = {k: v for k, v in qa.items() if v is not None}
            qb = {k: v for k, v in qb.items() if v is not None}
            if (
                qa.get("q") is not None
                and qb.get("q") is not None
                and qa["q"].shape == qb["q"].shape
            ):
                head = head_test(qa, qb, nh_a, nkv_a or nh_a, cfg.lap_max_units)
    if head is not None:
        head.update(layer_a=la, layer_b=lb)
    return {
        "layer_a": la,
        "layer_b": lb,
        "inplace": inplace,
        "blocks": blocks,
        "heads": head,
        "identity": identity,
    }


# Families whose heads are not exchangeable (a fixed per-head ALiBi slope orders them), so an
# identity test on heads has no exact null there.
ORDERED_HEADS = frozenset({"bloom", "mpt", "falcon_alibi", "baichuan_alibi"})


def _ordered_heads(view: ModelView) -> bool:
    cfg = view.source.config
    return bool(cfg.get("alibi")) or str(cfg.get("model_type")) in ORDERED_HEADS


def _group_rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups * r, H'] unit rows -> one flattened row per KV group."""
    return x.reshape(groups, (x.shape[0] // groups) * x.shape[1])


def _identity_tests(
    a: ModelView, b: ModelView, A: _Layer, B: _Layer, la: int, lb: int, diagonal: bool
) -> list[dict]:
    """Exact identity tests (compare/exact.py) on every unit axis both layers share: the FFN
    units of the dense MLP, of the shared expert and of each same-index routed expert, and (for
    layers paired by position, not chosen by the attention-based matching) the KV groups."""
    out: list[dict] = []
    names_a = {label: (e, roles) for label, e, roles in A.blocks()}
    for label, e, roles in B.blocks():
        if label not in names_a:
            continue
        ba, bb = A.block(names_a[label][0], roles), B.block(e, roles)
        keys = [k for k in ("gate", "up", "down") if k in ba and k in bb]
        t = identity_test([ba[k] for k in keys], [bb[k] for k in keys]) if keys else None
        if t is not None:
            out.append(
                {
                    "role": "mlp" if label == "mlp" else label,
                    "unit": "ffn unit",
                    "layer_a": la,
                    "layer_b": lb,
                    "expert": e,
                    "parts": keys,
                    **t,
                }
            )
    if diagonal and not (_ordered_heads(a) or _ordered_heads(b)):
        (nh_a, nkv_a), (nh_b, nkv_b) = _heads(a), _heads(b)
        if nh_a and nh_a == nh_b and (nkv_a or nh_a) == (nkv_b or nh_b):
            groups = nkv_a or nh_a
            pa, pb = [], []
            for role in ATTN:
                xa, xb = A.units(role), B.units(role)
                if xa is None or xb is None or xa.shape != xb.shape or xa.shape[0] % groups:
                    continue
                pa.append(_group_rows(xa, groups))
                pb.append(_group_rows(xb, groups))
            t = identity_test(pa, pb) if pa else None
            if t is not None:
                out.append(
                    {
                        "role": "attn",
                        "unit": "kv group",
                        "layer_a": la,
                        "layer_b": lb,
                        "expert": None,
                        **t,
                    }
                )
    return out


def _block_tests(
    a: ModelView, b: ModelView, A: _Layer, B: _Layer, la: int, lb: int, cfg: CompareConfig
) -> list[dict]:
    """Blocks of the model with more FFN blocks (the MoE) matched into the other's units.

    The pool is sized from the header shapes before anything is read. A pool over
    `compare.max_pool_units` is pre-matched when both sides have several blocks (MoE vs MoE,
    `_prematched_tests`); otherwise it is not matched and says so in the report (an `excluded`
    entry)."""
    blocks_a, blocks_b = A.blocks(), B.blocks()
    if not blocks_a or not blocks_b:
        return []
    src, dst, direction = (B, A, "b->a") if len(blocks_b) > len(blocks_a) else (A, B, "a->b")
    dst_blocks = dst.blocks()
    sizes = [dst.block_units(roles, e) or 0 for _, e, roles in dst_blocks]
    pool_units = sum(sizes)
    if pool_units > cfg.max_pool_units and len(dst_blocks) > 1 and len(src.blocks()) > 1:
        return _prematched_tests(src, dst, dst_blocks, sizes, direction, la, lb, cfg)
    if pool_units > cfg.max_pool_units:
        why = (
            f"unit pool of {pool_units} units ({len(dst_blocks)} blocks) exceeds "
            f"compare.max_pool_units={cfg.max_pool_units}; unit matching not run"
        )
        log.warning("layers %d/%d: %s", la, lb, why)
        return [
            {
                "block": "all",
                "expert": None,
                "direction": direction,
                "layer_a": la,
                "layer_b": lb,
                "excluded": why,
                "pool": pool_units,
            }
        ]
    pool_parts = [p for p in (dst.block(e, roles) for _, e, roles in dst_blocks) if p]
    local = None
    if len(pool_parts) > 1:
        local = np.concatenate([np.arange(next(iter(p.values())).shape[0]) for p in pool_parts])
    pool = {}
    for short in ("gate", "up", "down"):
        parts = [p[short] for p in pool_parts if short in p]
        if len(parts) == len(pool_parts) and parts:
            pool[short] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    del pool_parts
    # checked once per layer, not once per block matched into it; a degenerate pool is left to
    # block_test, which then names the reason per block
    pool_ok = not any(degenerate(x) for x in pool.values())
    out = []
    for label, expert, roles in src.blocks():
        t = block_test(src.block(expert, roles), pool, cfg.lap_max_units, local, pool_ok)
        if t is not None:
            out.append(_block_entry(src, label, expert, direction, la, lb, t))
    return out


def _block_entry(
    src: _Layer, label: str, expert: int | None, direction: str, la: int, lb: int, t: dict
) -> dict:
    group = src.view.group_of(src.layer, expert) if expert is not None else None
    return {
        "block": label,
        "expert": expert,
        "group": group,
        "direction": direction,
        "layer_a": la,
        "layer_b": lb,
        **t,
    }


def _prematched_tests(
    src: _Layer,
    dst: _Layer,
    dst_blocks: list[tuple[str, int | None, dict[str, str]]],
    sizes: list[int],
    direction: str,
    la: int,
    lb: int,
    cfg: CompareConfig,
) -> list[dict]:
    """MoE vs MoE with more units than `compare.max_pool_units` (91,392 for Pangu vs Pangu):
    each block of `src` is matched into a pool of the `dst` blocks whose `expert_sketch` is most
    similar (most similar first while they fit in max_pool_units, at most
    PREMATCH_CANDIDATES), instead of into
    every unit of the layer. The candidates are listed in the report."""
    sketches = torch.stack([expert_sketch(dst.block(e, roles)) for _, e, roles in dst_blocks])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for label, expert, roles in src.blocks():
        blk = src.block(expert, roles)
        sim = sketches @ expert_sketch(blk) if blk else None
        if sim is None or sim.numel() == 0:
            continue
        picked, units = [], 0  # most similar first, while the pool fits max_pool_units
        for k in torch.argsort(sim, descending=True).tolist():
            if len(picked) == PREMATCH_CANDIDATES or (
                picked and units + sizes[k] > cfg.max_pool_units
            ):
                break
            picked.append(k)
            units += sizes[k]
        picked.sort()
        parts = [dst.block(dst_blocks[k][1], dst_blocks[k][2]) for k in picked]
        shorts = [r for r in ("gate", "up", "down") if all(r in p for p in parts)]
        pool = {r: torch.cat([p[r] for p in parts], dim=0) for r in shorts}
        local = np.concatenate([np.arange(sizes[k]) for k in picked])
        place = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in picked])
        t = block_test(blk, pool, cfg.lap_max_units, local, place=(place, int(offsets[-1])))
        if t is not None:
            t["candidates"] = [dst_blocks[k][0] for k in picked]
            out.append(_block_entry(src, label, expert, direction, la, lb, t))
    return out
