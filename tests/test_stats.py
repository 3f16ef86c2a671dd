"""Statistics against numpy float64 on adversarial data, and exact merging across partitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from npu_fp.device import Device, bf16_to_float32
from npu_fp.stats.kernel import MomentKernel
from npu_fp.stats.moments import Moments, finish

CPU = Device("cpu", None, "cpu", supports_bf16=True)
NO_BF16 = Device("cpu", None, "cpu (as 310P)", supports_bf16=False)


def reference(x: np.ndarray) -> dict:
    x = x.astype(np.float64).ravel()
    fin = x[np.isfinite(x)]
    return {
        "mean": fin.mean(),
        "std": fin.std(ddof=1),
        "rms": np.sqrt(np.mean(fin**2)),
        "l2": np.sqrt(np.sum(fin**2)),
        "min": fin.min(),
        "max": fin.max(),
        "absmax": np.abs(fin).max(),
        "kurtosis": scipy.stats.kurtosis(fin),
        "skew": scipy.stats.skew(fin),
        "nan": int(np.isnan(x).sum()),
        "inf": int(np.isinf(x).sum()),
        "finite": fin.size,
    }


def assert_matches(got: dict, ref: dict, rtol: float = 1e-9) -> None:
    for key in ("mean", "std", "rms", "l2", "min", "max", "absmax"):
        assert got[key] == pytest.approx(ref[key], rel=rtol, abs=0), key
    # kurtosis/skew are differences of O(1) quantities: compare absolutely at the same scale
    assert got["kurtosis"] == pytest.approx(ref["kurtosis"], rel=rtol, abs=1e-9)
    assert got["skew"] == pytest.approx(ref["skew"], rel=rtol, abs=1e-9)
    for key in ("nan", "inf", "finite"):
        assert got[key] == ref[key], key


@pytest.mark.parametrize(
    "mean,std,dtype",
    [
        (0.01, 0.02, torch.float32),
        (1.0, 0.02, torch.bfloat16),  # mean/std = 50: breaks fp32 sum-of-squares formulas
        (1e4, 1e-2, torch.float64),  # mean/std = 1e6: breaks float64 raw power sums
        (-3.0, 0.5, torch.float16),
    ],
)
def test_moments_match_numpy_float64(mean: float, std: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1_000_003, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    got = finish(MomentKernel(CPU, chunk_elems=65536).moments(x))
    assert_matches(got, reference(x.to(torch.float64).numpy()))


def test_heavy_tails_and_outliers() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.distributions.StudentT(3.0).sample((300_000,)).to(torch.float64)
    x[17] = 1e6  # one huge outlier dominates the fourth moment
    got = finish(MomentKernel(CPU, chunk_elems=4096).moments(x))
    assert_matches(got, reference(x.numpy()))
    del g


def test_nan_and_inf_are_counted_not_fatal() -> None:
    x = torch.randn(100_000, dtype=torch.float64)
    x[5], x[50_000], x[99_999] = float("nan"), float("inf"), float("-inf")
    got = finish(MomentKernel(CPU, chunk_elems=8192).moments(x.to(torch.bfloat16)))
    ref = reference(x.to(torch.bfloat16).to(torch.float64).numpy())
    assert got["nan"] == 1 and got["inf"] == 2 and got["numel"] == 100_000
    assert_matches(got, ref)


def test_all_nonfinite_tensor() -> None:
    got = finish(MomentKernel(CPU).moments(torch.full((10,), float("nan"))))
    assert got["nan"] == 10 and got["finite"] == 0 and got["std"] is None


def test_merge_is_exact_regardless_of_partition() -> None:
    """Merging partials of any split agrees with the whole to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g, dtype=torch.float64) * 0.3 + 7.0
    k = MomentKernel(CPU, chunk_elems=10_000)
    whole = finish(k.moments(x))
    for cuts in ([0, 200_000], [0, 1, 99_999, 200_000], [0, 66_666, 133_333, 200_000]):
        m = Moments()
        for a, b in zip(cuts, cuts[1:], strict=False):
            m.merge(k.moments(x[a:b]))
        got = finish(m)
        for key in ("mean", "std", "kurtosis", "skew", "min", "max"):
            assert got[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)


def test_widening_without_device_bf16_is_exact() -> None:
    x = (torch.randn(50_000, dtype=torch.float64) * 0.02 + 1.0).to(torch.bfloat16)
    assert torch.equal(bf16_to_float32(x), x.to(torch.float32))
    a = finish(MomentKernel(CPU).moments(x))
    b = finish(MomentKernel(NO_BF16).moments(x))
    assert a == b


@pytest.mark.slow
def test_more_than_1e8_elements() -> None:
    """> 1e8 bf16 elements with a large mean: float64 chunked accumulation stays at 1e-9."""
    n = 100_000_007
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(n, generator=g) * 0.02 + 1.0).to(torch.bfloat16)
    got = finish(MomentKernel(CPU, chunk_elems=1 << 20).moments(x))
    xd = x.to(torch.float64)
    mean = xd.mean().item()
    d = xd - mean
    std = (d.square().sum().item() / (n - 1)) ** 0.5
    assert got["mean"] == pytest.approx(mean, rel=1e-9)
    assert got["std"] == pytest.approx(std, rel=1e-9)
    m2 = d.square().mean().item()
    kurt = d.square().square().mean().item() / m2**2 - 3.0
    assert got["kurtosis"] == pytest.approx(kurt, rel=1e-9, abs=1e-9)


def test_chunks_with_different_means_take_the_right_path() -> None:
    """A tensor that starts centred and then shifts far away: raw sums for the first chunks,
    centring for the shifted ones, all merged to float64 accuracy."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g, dtype=torch.float64) * 0.02
    x[150_000:] += 1e3
    got = finish(MomentKernel(CPU, chunk_elems=50_000).moments(x))
    assert_matches(got, reference(x.numpy()))
