"""Per-layer weight tests on aligned residual coordinates.

- `inplace_test`: elementwise agreement of same-shape matrices (nothing permuted).
- `block_test`: hidden units of one FFN block (dense FFN, shared expert or routed expert) matched
  into the other model's FFN units three times, independently: by gate rows, by up rows and by
  down columns. A derivative keeps each unit's gate, up and down together, so the three matchings
  agree; under independent initialisation they are independent, and the Spearman correlation of
  each pair of matchings has mean 0 and variance 1/(n-1) exactly. This is the rank statistic of
  one matching composed with the inverse of another, against the identity, and it survives any
  function-preserving permutation of units. The same construction on heads uses q rows vs o
  columns (and k vs v for KV heads).
- `sketch`: a seeded random projection of a matrix in aligned coordinates, for the cheap
  layer x layer similarity.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from npu_fp.compare.align import Residual, selfnorm_z
from npu_fp.compare.exact import degenerate
from npu_fp.compare.margins import margin_logp
from npu_fp.compare.stats import agreement_z, log_norm_sf, spearman
from npu_fp.device import bf16_ok

# Roles whose matrix reads the residual stream on its input side (columns); the others write it.
READERS = frozenset(
    {
        "attn.q",
        "attn.k",
        "attn.v",
        "mlp.gate",
        "mlp.up",
        "moe.router",
        "moe.expert.gate",
        "moe.expert.up",
        "moe.shared.gate",
        "moe.shared.up",
    }
)
WRITERS = frozenset({"attn.o", "mlp.down", "moe.expert.down", "moe.shared.down"})
HIST_BINS = 64
# Similarity matrices of at least this many cells are multiplied in bf16 (3x the fp32 rate here:
# 1344 x 13824 expert-into-FFN matchings); smaller ones, which include every real-weight null
# pair the margin envelope was calibrated on, stay float32. bf16 cosines carry 3 digits: enough
# to rank a parent unit (cosine ~0.99) far above the rest.
BF16_MIN_CELLS = 1 << 24


def to_units(
    m: torch.Tensor, role: str, res: Residual, side: str, device: torch.device
) -> torch.Tensor:
    """[units, residual'] on the device: residual dims mapped (B's signs applied)."""
    m = m.to(device)
    dim = m.shape[1] if role in READERS else m.shape[0]
    if res.size == dim and res.in_place:
        return m if role in READERS else m.t().contiguous()
    idx_a, idx_b, sign = res.tensors()
    idx = (idx_a if side == "a" else idx_b).to(device)
    x = m.index_select(1, idx) if role in READERS else m.index_select(0, idx).t().contiguous()
    if side == "b":
        x = x * sign.to(device)
    return x


# Projection salt per FFN matrix: the same random axes for both models, different per matrix so
# the three matchings of a unit use independent projections.
SALT = {"gate": 0, "up": 1, "down": 2}


@functools.lru_cache(maxsize=16)
def _projection_host(dim: int, k: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * dim + 7919 * k + salt)
    return torch.randn(dim, k, generator=g) / math.sqrt(k)


def projection(dim: int, k: int, device: torch.device, salt: int = 0) -> torch.Tensor:
    """The same seeded Gaussian [dim, k] on every rank and for both models (drawn once)."""
    return _projection_host(dim, k, salt).to(device)


def project(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x @ p as float32; bf16 rows are multiplied in bf16 where the device has bf16 kernels
    (4.5x the fp32 matmul rate on this host, and no widened copy of the full-width rows),
    everything else in float32."""
    if x.dtype == torch.bfloat16 and bf16_ok(x.device):
        return (x @ p.to(torch.bfloat16)).float()
    return x.float() @ p


def reduce_dims(x: torch.Tensor, proj_dim: int, salt: int = 0) -> torch.Tensor:
    """[units, proj_dim] float32: the residual axis projected when wider than proj_dim."""
    if x.shape[1] <= proj_dim:
        return x.float()
    return project(x, projection(x.shape[1], proj_dim, x.device, salt))


def inplace_test(xa: torch.Tensor, xb: torch.Tensor) -> dict | None:
    if xa.shape != xb.shape or xa.numel() < 256:
        return None
    xa, xb = xa.float(), xb.float()
    # unit-variance first, so products of small weights stay far from float32's underflow
    xa = (xa - xa.mean()) / xa.std().clamp_min(1e-30)
    xb = (xb - xb.mean()) / xb.std().clamp_min(1e-30)
    xy = xa * xb
    s, q = float(xy.sum()), float((xy * xy).sum())
    z = s / math.sqrt(q) if q > 0 else 0.0
    r = s / (xa.numel() - 1)  # both have unit sample variance: the sum is (n - 1) r
    return {"n": int(xa.numel()), "r": r, "z": z, "log_p": log_norm_sf(z)}


def match(x: torch.Tensor, y: torch.Tensor, lap_max: int) -> tuple[np.ndarray, str]:
    """Index into y's rows for each row of x, and the method used.

    Rule: the exact one-to-one LAP (scipy) when x has at most `lap_max` rows and no more than y;
    row argmax otherwise. Where the row argmax is already one-to-one it *is* the LAP optimum
    (every row gets its best column), so the LAP is skipped: a derivative's experts cost one
    matmul, and only contested matchings pay the LAP (1344 x 13824: 0.19 s here)."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    yn = y.float() / y.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    n, m = x.shape[0], y.shape[0]
    if n * m >= BF16_MIN_CELLS and bf16_ok(xn.device):
        xn, yn = xn.to(torch.bfloat16), yn.to(torch.bfloat16)
    out = np.empty(n, dtype=np.int64)
    step = max(1, (1 << 24) // max(m, 1))
    yt = yn.t().contiguous()  # a transposed view can take a slow non-BLAS path on the host
    for i in range(0, n, step):
        out[i : i + step] = (xn[i : i + step] @ yt).argmax(dim=1).cpu().numpy()
    if not (n <= m and n <= lap_max):
        return out, "argmax"
    if np.unique(out).size == n:
        return out, "lap"
    c = (xn @ yt).float().cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    out[rows] = cols
    return out, "lap"


def agreement(matchings: list[np.ndarray], n: int) -> tuple[list[float], float, float]:
    rhos = []
    for i in range(len(matchings)):
        for j in range(i + 1, len(matchings)):
            rho = spearman(matchings[i], matchings[j])
            if rho is not None:
                rhos.append(rho)
    z = agreement_z(rhos, n)
    return rhos, z, log_norm_sf(z)


def block_test(
    block: dict[str, torch.Tensor],
    pool: dict[str, torch.Tensor],
    lap_max: int,
    local: np.ndarray | None = None,
    pool_checked: bool = False,
    place: tuple[np.ndarray, int] | None = None,
) -> dict | None:
    """Match one FFN block's units (gate rows, up rows, down columns) into a pool of units.

    Both sides are projected rows (`reduce_dims`, the same axes for both models); `pool_checked`
    says the caller already ran `degenerate` on the pool (it is shared by every block of a layer).
    `place` = (unit index of each pool row in the whole model's layer, units there): the
    histogram of parent positions is then over the whole layer (a pre-matched candidate pool).

    `local` maps a pool index to its unit index inside its own block: when the pool holds several
    blocks (the experts of a MoE), agreement is judged on that index, so a unit matched by gate in
    one expert and by up in a copy of that expert (Mixtral experts are copies) still agrees.
    """
    roles = [r for r in ("gate", "up", "down") if r in block and r in pool]
    n, m = block[roles[0]].shape[0] if roles else 0, pool[roles[0]].shape[0] if roles else 0
    if len(roles) < 2 or n < 4 or m < 4:
        return None
    for r in roles:
        why = degenerate(block[r]) or (None if pool_checked else degenerate(pool[r]))
        if why:
            return {"excluded": why, "n": n, "pool": m, "roles": roles}
    matched = [match(block[r], pool[r], lap_max) for r in roles]
    maps = [mp for mp, _ in matched]
    keys = [local[mp] for mp in maps] if local is not None else maps
    rhos, z, logp = agreement(keys, n)
    agree = np.all([k == keys[0] for k in keys[1:]], axis=0)
    where, total = place if place is not None else (np.arange(m), m)
    hist = np.bincount((where[maps[0][agree]] * HIST_BINS) // total, minlength=HIST_BINS)
    agreeing = int(agree.sum())
    return {
        "n": n,
        "pool": m,
        "roles": roles,
        "rho": rhos,
        "z": z,
        "log_p": logp,
        "agree": agreeing,
        "margin_log_p": margin_logp(agreeing, n, len(roles)),
        "frac": float(agree.mean()),
        "hist": hist.tolist(),
        "method": matched[0][1],
    }


def expert_sketch(block: dict[str, torch.Tensor]) -> torch.Tensor:
    """A unit-order-free sketch of one FFN block from its projected rows: per matrix the Gram
    X^T X / n with its isotropic part removed, unit-normed, concatenated. Experts cut from the
    same parent units share it; independent experts' sketches are near-orthogonal noise."""
    parts = []
    for short in ("gate", "up", "down"):
        x = block.get(short)
        if x is None:
            continue
        g = (x.t() @ x).double() / max(x.shape[0], 1)
        g -= torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * g.diagonal().mean()
        parts.append(g.flatten() / g.norm().clamp_min(1e-30))
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    """[count * d, H'] unit rows -> one flattened row per head."""
    d = x.shape[0] // count
    return x.reshape(count, d * x.shape[1])


def head_test(
    qa: dict[str, torch.Tensor], qb: dict[str, torch.Tensor], nh: int, nkv: int, lap_max: int
) -> dict | None:
    """Heads matched by q rows and by o columns (and KV heads by k and by v), then agreement."""
    zs, rhos = [], []
    for side in (qa, qb):
        for r, x in side.items():
            why = degenerate(x)
            if why:
                return {"excluded": f"{r}: {why}", "n": nh, "kv": nkv}
    for (r1, r2), count in ((("q", "o"), nh), (("k", "v"), nkv)):
        if count < 3 or not all(r in qa and r in qb for r in (r1, r2)):
            continue
        maps = [match(heads(qa[r], count), heads(qb[r], count), lap_max)[0] for r in (r1, r2)]
        rh, z, _ = agreement(maps, count)
        rhos += rh
        zs.append(z)
    if not zs:
        return None
    z = sum(zs) / math.sqrt(len(zs))
    return {"n": nh, "kv": nkv, "rho": rhos, "z": z, "log_p": log_norm_sf(z)}


def sketch(x: torch.Tensor, k: int) -> torch.Tensor:
    """[units, k] seeded projection of the aligned residual axis (cheap layer x layer tests)."""
    return project(x, projection(x.shape[1], k, x.device, salt=99)).cpu()


def sketch_z(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor]) -> float | None:
    zs = []
    for role, xa in sa.items():
        xb = sb.get(role)
        if xb is not None and xb.shape == xa.shape:
            zs.append(selfnorm_z(xa - xa.mean(), xb - xb.mean()))
    return sum(zs) / math.sqrt(len(zs)) if zs else None


def monotone_match(z: np.ndarray) -> list[tuple[int, int]]:
    """Each layer of the shallower model to a distinct deeper layer, in order, maximising sum z."""
    flip = z.shape[0] > z.shape[1]
    s = z.T if flip else z
    n, m = s.shape
    best = np.full((n + 1, m + 1), -np.inf)
    best[0, :] = 0.0
    for i in range(1, n + 1):
        for j in range(i, m + 1):
            best[i, j] = max(best[i, j - 1], best[i - 1, j - 1] + s[i - 1, j - 1])
    pairs, i, j = [], n, m
    while i > 0:
        if j > i and best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    pairs.reverse()
    return [(b, a) for a, b in pairs] if flip else pairs
