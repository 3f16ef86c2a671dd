"""Identity tests with exact permutation nulls: do B's units sit where A's are?

Null hypothesis (the exactness argument of Zhu et al., arXiv 2502.12292): B was trained
independently of A by an algorithm that is equivariant to permutations of B's units (hidden units
of one FFN, attention KV groups of one layer, or residual-stream dimensions), starting from an
initialisation whose distribution is invariant to those permutations. Then B and sigma(B) are
equally likely for every permutation sigma, whatever A is and whatever both models learned from
shared data: shared semantics can make *some* unit of B resemble a unit of A, but nothing can make
it sit at the *same index* more often than chance. No alignment is fitted on the units tested.

Statistic: X = sum_i a[i, i], where a[i, k] in [0, 1] is the clamped cosine similarity of unit i of
A and unit k of B (mean over the matrices that carry the unit). Under the null, X has the
distribution of sum_i a[i, sigma(i)] over a uniform permutation sigma, and Chatterjee's
concentration inequality for such sums (Chatterjee 2007, "Stein's method for concentration
inequalities", Prop. 1.1: P(|X - EX| >= t) <= 2 exp(-t^2 / (4 EX + 2t)) for entries in [0, 1])
bounds the p-value without any distributional assumption on the weights.

FFN units are compared on their rows projected to `compare.proj_dim` dims by a seeded Gaussian
matrix (the same for both models, drawn before and independently of any pairing): a[i, k] is
then a fixed function of row i of A and row k of B, so the permutation null holds exactly as on
full rows, and the [n, m] similarity costs n m proj_dim instead of n m width (21 x 3 blocks of
5632 x 5632 x 2048 was most of a 2 GiB pair's compare time). The bound is
conservative (a valid p-value, never smaller than the exact permutation p-value), and strong
enough that a derivative's thousands of matching units give log p in the hundreds or thousands.

What breaks the null (stated in reports): a shared *fixed* coordinate convention that training
does not forget, such as sinusoidal absolute position encodings (hidden dimensions) or ALiBi head
slopes (heads); models with either get no identity test on that axis.
"""

from __future__ import annotations

import math

import torch

BLOCK_ROWS = 4096  # rows of the [n, m] similarity matrix formed at a time (bounded memory)
MIN_UNITS = 4  # fewer units cannot reach any useful p-value


def degenerate(x: torch.Tensor) -> str | None:
    """Why a [units, features] block cannot carry lineage evidence, or None.

    A matching on a constant, zero or rank-one block is decided by ties (a LAP returns the
    identity on a constant similarity matrix), so such blocks would "agree" with anything."""
    if x.numel() == 0:
        return "empty block"
    if not bool(torch.isfinite(x).all()):
        return "non-finite weights"
    xf = x.float()
    if float(xf.abs().max()) == 0.0:
        return "all-zero weights"
    if float((xf - xf[:1]).abs().max()) == 0.0:
        return "constant weights (every unit identical)"
    k = min(8, xf.shape[0], xf.shape[1])
    g = torch.Generator().manual_seed(12345)
    probe = xf @ torch.randn(xf.shape[1], k, generator=g).to(xf.device)
    sv = torch.linalg.svdvals(probe.double())
    if sv.numel() < 2 or float(sv[1]) <= 1e-6 * float(sv[0]):
        return "rank-one weights (every unit a multiple of one vector)"
    return None


def _unit_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Rows scaled to unit norm in float32; None when no row carries signal."""
    x = x.float()
    norms = x.norm(dim=1, keepdim=True)
    if not bool((norms > 0).any()):
        return None
    return x / norms.clamp_min(1e-30)


def clamped_cosines(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(diagonal of a, sum of all entries of a) for a = max(cos(A_i, B_k), 0), streamed in row
    blocks so the [n, m] matrix is never whole. Needs n <= m; None when a side is all zero."""
    ua, ub = _unit_rows(xa), _unit_rows(xb)
    if ua is None or ub is None:
        return None
    n = ua.shape[0]
    diag = torch.zeros(n, dtype=torch.float64)
    total = 0.0
    ubt = ub.t().contiguous()
    for r0 in range(0, n, BLOCK_ROWS):
        r1 = min(n, r0 + BLOCK_ROWS)
        block = (ua[r0:r1] @ ubt).clamp_(0.0, 1.0)
        # rows summed in float32 (at most m entries in [0, 1] each), rows in float64: a float64
        # sum over the whole block converts every entry first and cost 0.4 s per 5632 x 5632
        total += float(block.sum(dim=1).double().sum())
        idx = torch.arange(r0, r1, device=block.device)
        diag[r0:r1] = block[idx - r0, idx].double().cpu()
    return diag, total


def chatterjee_logp(x: float, mean: float) -> float:
    """log of 2 exp(-t^2 / (4 EX + 2t)), t = X - EX, capped at log 1."""
    t = x - mean
    if t <= 0:
        return 0.0
    return min(0.0, math.log(2.0) - t * t / (4.0 * mean + 2.0 * t))


def identity_test(parts_a: list[torch.Tensor], parts_b: list[torch.Tensor]) -> dict | None:
    """Units of A vs the same-index units of B, one [units, features] matrix per part
    (e.g. gate rows, up rows, down columns): a[i, k] is the mean clamped cosine over parts.

    B may have more units than A (m >= n): the permutation is then over all of B's m units and
    rows of A beyond n count as zero, which keeps the bound valid.
    """
    pairs = [
        (pa, pb)
        for pa, pb in zip(parts_a, parts_b, strict=True)
        if pa.ndim == 2 and pb.ndim == 2 and pa.shape[1] == pb.shape[1]
    ]
    if not pairs:
        return None
    n, m = pairs[0][0].shape[0], pairs[0][1].shape[0]
    if any(pa.shape[0] != n or pb.shape[0] != m for pa, pb in pairs):
        return None
    if n > m:  # the bound is symmetric in A and B: put the side with fewer units first
        pairs = [(pb, pa) for pa, pb in pairs]
        n, m = m, n
    if n < MIN_UNITS:
        return None
    for pa, pb in pairs:
        why = degenerate(pa) or degenerate(pb)
        if why:
            return {"excluded": why, "n": n, "m": m}
    diag = torch.zeros(n, dtype=torch.float64)
    total = 0.0
    for pa, pb in pairs:
        got = clamped_cosines(pa, pb)
        assert got is not None, "all-zero parts were excluded by degenerate()"
        diag += got[0]
        total += got[1]
    diag /= len(pairs)
    total /= len(pairs)
    x = float(diag.sum())
    mean = total / m
    if total / (n * m) > 0.999:  # every unit looks like every other: constant blocks
        return {"excluded": "constant weights (every unit identical)", "n": n, "m": m}
    return {
        "n": n,
        "m": m,
        "x": x,
        "mean": mean,
        "mean_diag_cos": x / n,
        "log_p": chatterjee_logp(x, mean),
        "matching_units": int((diag > 0.5).sum()),
    }
