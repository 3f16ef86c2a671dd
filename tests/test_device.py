"""Device selection and the torch_npu guard, with torch_npu mocked (CI never installs it)."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from npu_fp import device as dev
from npu_fp.config import RunConfig, StatsConfig
from npu_fp.dist import DistContext, backend_for, distributed
from npu_fp.fingerprint import stats_sizes


@pytest.fixture(autouse=True)
def fresh_cache():
    dev.try_torch_npu.cache_clear()
    yield
    dev.try_torch_npu.cache_clear()


def test_import_guard_sets_autoload_off_before_torch() -> None:
    code = (
        "import os; os.environ.pop('TORCH_DEVICE_BACKEND_AUTOLOAD', None); "
        "import npu_fp.device, sys; print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "0"


def test_no_torch_npu_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda name: None)
    assert dev.try_torch_npu() is None
    with pytest.raises(ValueError, match="torch_npu is not installed or cannot load"):
        dev.resolve_device("npu")


@pytest.mark.parametrize(
    "exc",
    [
        ImportError("libhccl.so: cannot open"),
        OSError("x"),
        RuntimeError("Two accelerators cannot be used"),
    ],
)
def test_broken_torch_npu_is_caught(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    spec = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda name: spec)
    real_import = __import__

    def fake_import(name, *a, **k):
        if name == "torch_npu":
            raise exc
        return real_import(name, *a, **k)

    monkeypatch.setattr("builtins.__import__", fake_import)
    assert dev.try_torch_npu() is None


def fake_npu(monkeypatch: pytest.MonkeyPatch, name: str, count: int = 2) -> list[int]:
    spec = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda n: spec)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    bound: list[int] = []
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: count,
        set_device=bound.append,
        get_device_name=lambda i: name,
    )
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return bound


def test_npu_910_binds_local_rank_and_keeps_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = fake_npu(monkeypatch, "Ascend910B3")
    d = dev.resolve_device("auto", local_rank=1)
    assert (d.type, d.index, d.supports_bf16, bound) == ("npu", 1, True, [1])


def test_npu_310p_has_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npu(monkeypatch, "Ascend310P3")
    assert dev.resolve_device("npu").supports_bf16 is False


def test_local_rank_beyond_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npu(monkeypatch, "Ascend910B3", count=2)
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but only 2 npu devices"):
        dev.resolve_device("npu", local_rank=3)


def test_backend_follows_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = dev.Device("cpu", None, "cpu", True)
    assert backend_for(cpu) == "gloo"
    # torch_npu registers its backend in torch's map on import; mimic that registration
    monkeypatch.setitem(dist.Backend.default_device_backend_map, "npu", "hccl")
    assert backend_for(dev.Device("npu", 0, "Ascend910B3", True)) == "hccl"
    assert backend_for(dev.Device("cuda", 0, "H100", True)) == "nccl"


def test_cuda_requested_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device=cuda"):
        dev.resolve_device("cuda")


def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with distributed("cpu") as ctx:
        assert isinstance(ctx, DistContext)
        assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
        assert not dist.is_initialized()


@pytest.mark.parametrize(
    "device_type,chunk,window", [("cpu", 1 << 18, 32 << 20), ("cuda", 1 << 24, 256 << 20)]
)
def test_statistics_sizes_follow_the_selected_device(
    device_type: str, chunk: int, window: int
) -> None:
    """`device=auto` that lands on a GPU gets the GPU sizes: they follow the device in use, not
    the preset name; explicit stats.* values win."""
    ctx = DistContext(0, 0, 1, dev.Device(device_type, None, device_type, supports_bf16=True))
    assert stats_sizes(RunConfig(device="auto", out_dir="."), ctx) == (chunk, window)
    given = RunConfig(out_dir=".", stats=StatsConfig(chunk_elems=1000, read_bytes=8192))
    assert stats_sizes(given, ctx) == (1000, 8192)
