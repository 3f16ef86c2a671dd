"""The one module that knows CPUs, CUDA GPUs and Ascend NPUs differ.

torch_npu is imported here and nowhere else, behind a guard: without CANN, merely having torch_npu
installed makes a plain `import torch` fail through torch's device-backend autoload, so the switch
is turned off (setdefault: a user's explicit `TORCH_DEVICE_BACKEND_AUTOLOAD=1` on a real Ascend
host wins) before torch is first imported.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from types import ModuleType

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402

log = logging.getLogger(__name__)


@functools.cache
def try_torch_npu() -> ModuleType | None:
    """torch_npu when installed, loadable and seeing a device; None otherwise (never raises)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        # optional: only where torch_npu is installed (Ascend); importing it without CANN fails
        import torch_npu  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # missing CANN libs, device conflict, init
        log.info("torch_npu is installed but unusable: %s", e)
        return None
    npu = getattr(torch, "npu", None)
    return torch_npu if npu is not None and npu.is_available() else None


@dataclass(frozen=True, slots=True)
class Device:
    type: str  # "cpu" | "cuda" | "npu"
    index: int | None
    name: str  # human-readable model name
    supports_bf16: bool

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @property
    def chunk_elems(self) -> int:
        """Default elements per statistics kernel step: L2-sized on the CPU; big on an
        accelerator, so one host-to-device transfer keeps an HBM-bound device busy."""
        return 1 << 18 if self.type == "cpu" else 1 << 24

    @property
    def read_bytes(self) -> int:
        """Default host read window per rank (mapped bytes handed to the device at once)."""
        return 32 << 20 if self.type == "cpu" else 256 << 20


def free_memory_bytes(device: Device) -> int:
    """Memory this device can still allocate: free device memory on an accelerator, available
    host RAM (`MemAvailable`, which counts reclaimable page cache) on the CPU."""
    if device.type in ("cuda", "npu"):
        free, _total = getattr(torch, device.type).mem_get_info(device.index or 0)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc: free pages only


def available_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if try_torch_npu() is not None:
        return "npu"
    return "cpu"


def resolve_device(requested: str, local_rank: int = 0) -> Device:
    """`auto | cpu | cuda | npu` -> the device this rank uses, bound to LOCAL_RANK."""
    dtype = available_type() if requested == "auto" else requested
    if dtype == "cpu":
        return Device("cpu", None, "cpu", supports_bf16=True)
    if dtype == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda, but torch sees no CUDA device (CPU-only torch build?)")
        count = torch.cuda.device_count()
    elif dtype == "npu":
        if try_torch_npu() is None:
            raise ValueError(
                "device=npu, but torch_npu is not installed or cannot load (is CANN's set_env.sh "
                "sourced? see launch/ascend.sh)"
            )
        count = torch.npu.device_count()
    else:
        raise ValueError(f"device must be auto, cpu, cuda or npu, got {requested!r}")
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {count} {dtype} devices are visible; lower "
            "--nproc_per_node or widen CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES"
        )
    module = getattr(torch, dtype)
    module.set_device(local_rank)
    name = str(module.get_device_name(local_rank))
    return Device(dtype, local_rank, name, supports_bf16=_bf16_supported(dtype, name))


def _bf16_supported(dtype: str, name: str) -> bool:
    if dtype == "npu":
        # Atlas 300I Duo (Ascend 310P) has no bf16 kernels; 910-class chips do
        return "310" not in name
    if dtype == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return True


@functools.lru_cache(maxsize=8)
def bf16_ok(device: torch.device) -> bool:
    """Whether bf16 kernels run on this torch device (compare multiplies bf16 weights there)."""
    if device.type not in ("cuda", "npu"):
        return device.type == "cpu"
    module = getattr(torch, device.type)
    return _bf16_supported(device.type, str(module.get_device_name(device.index or 0)))


def to_device_float(x: torch.Tensor, device: Device) -> torch.Tensor:
    """Move a host tensor to the device; bf16 is widened on the host where the device lacks it."""
    if x.dtype == torch.bfloat16 and not device.supports_bf16:
        # a 16-bit shift is exactly bf16 -> fp32; done on the host, no device bf16 kernel runs
        x = bf16_to_float32(x)
    return x.to(device.torch)


def bf16_to_float32(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
