"""Checkpoint tensors of one layer -> the state dict its module expects, read straight onto the device.

Names are mapped from the checkpoint's layout to the module's (renames such as Mixtral's
`block_sparse_moe.` -> `mlp.`); per-expert matrices (`experts.{e}.gate_proj` / `w1`, `up_proj` / `w3`,
`down_proj` / `w2`) are written into the fused 3-D `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I] that transformers 5 modules hold, without a host-side copy of the stack.
Reads go through one bounded host buffer, block of rows by block of rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from npu_fp.device import Device, to_device_float
from npu_fp.forward.errors import WeightLayoutError
from npu_fp.io.reader import FileCache, RowReader, row_blocks, scale_for
from npu_fp.io.safetensors_header import TensorRef

EXPERT_RE = re.compile(
    r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\."
    r"(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)\.weight$"
)
# which fused tensor (and which half of it) a per-expert matrix belongs to
EXPERT_SLOTS: dict[str, tuple[str, int | None]] = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", None),
    "down_proj": ("down_proj", None),
    # one expert of a stored fused stack (io/expert_stacks.py): its whole [2I, H] slot
    "gate_up_proj": ("gate_up_proj", None),
}
# checkpoint entries that are not module weights (rotary caches, FP8 and KV-cache scales)
AUX_SUFFIXES = ("rotary_emb.inv_freq", "weight_scale_inv", "kv_cache_scale", "kv_cache_offset")


@dataclass(frozen=True, slots=True)
class Piece:
    ref: TensorRef
    expert: int | None = None  # index into a fused [E, ...] tensor
    half: int | None = None  # 0 / 1: first or second half of dim 1 of a fused gate_up tensor


def map_layer(
    layer: int,
    local: dict[str, TensorRef],
    expected: dict[str, tuple[int, ...]],
    renames: tuple[tuple[str, str], ...] = (),
    optional: tuple[str, ...] = (),
) -> dict[str, list[Piece]]:
    """Checkpoint tensors (names relative to the layer) -> pieces of each module tensor.

    Raises WeightLayoutError naming the layer and tensors when something is missing, extra or of the
    wrong shape. Keys in `optional` (buffers such as DeepSeek's selection bias) may be absent.
    """
    plan: dict[str, list[Piece]] = {}
    for name, ref in sorted(local.items()):
        if name.endswith(AUX_SUFFIXES):
            continue
        mapped = name
        for old, new in renames:
            mapped = mapped.replace(old, new)
        m = EXPERT_RE.match(mapped)
        if m and mapped not in expected:
            target, half = EXPERT_SLOTS[m["w"]]
            plan.setdefault(f"{m['pre']}.{target}", []).append(Piece(ref, int(m["e"]), half))
        else:
            plan.setdefault(mapped, []).append(Piece(ref))
    extra = sorted(set(plan) - set(expected))
    missing = sorted(
        k for k in set(expected) - set(plan) if not any(k.endswith(o) for o in optional)
    )
    if extra or missing:
        raise WeightLayoutError(
            f"layer {layer}: checkpoint tensors do not match the forward implementation; "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    for key, pieces in plan.items():
        _check_shapes(layer, key, pieces, expected[key])
    return plan


def _check_shapes(layer: int, key: str, pieces: list[Piece], shape: tuple[int, ...]) -> None:
    if pieces[0].expert is None:
        got = tuple(pieces[0].ref.shape)
        if got != shape:
            raise WeightLayoutError(
                f"layer {layer}: {pieces[0].ref.name} has shape {list(got)}, the module expects "
                f"{key} of shape {list(shape)} ({pieces[0].ref.file})"
            )
        return
    n_exp = shape[0]
    halves = 2 if any(p.half is not None for p in pieces) else 1
    want = (shape[1] // halves, *shape[2:])
    seen = {(p.expert, p.half) for p in pieces}
    need = {(e, h) for e in range(n_exp) for h in ((0, 1) if halves == 2 else (None,))}
    if seen != need or len(seen) != len(pieces):
        lacking = sorted(need - seen, key=str)[:8]
        raise WeightLayoutError(
            f"layer {layer}: {key} needs {n_exp} experts; missing or duplicated (expert, half) "
            f"pieces {lacking or 'duplicates'} in {pieces[0].ref.file}"
        )
    for p in pieces:
        if tuple(p.ref.shape) != want:
            raise WeightLayoutError(
                f"layer {layer}: {p.ref.name} has shape {list(p.ref.shape)}, expected {list(want)} "
                f"to fill {key} {list(shape)}"
            )


class WeightReader:
    """Reads tensors (whole, or chosen rows) from the checkpoint onto the device."""

    def __init__(self, tensors: dict[str, TensorRef], device: Device, buffer_bytes: int) -> None:
        self.tensors = tensors
        self.device = device
        self.files = FileCache()
        self.reader = RowReader(self.files)
        self.buffer_bytes = buffer_bytes
        self.bytes_read = 0

    def close(self) -> None:
        self.files.close()

    def _rows(self, ref: TensorRef, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as a float host tensor, valid until the next read; FP8 dequantized."""
        self.bytes_read += (r1 - r0) * (ref.nbytes // max(ref.rows, 1))
        return self.reader.widen(
            ref, self.reader.read(ref, r0, r1), r0, scale_for(self.tensors, ref)
        )

    def fill(self, ref: TensorRef, dst: torch.Tensor) -> None:
        """Copy the whole tensor into `dst` (any shape with the same element count)."""
        flat = dst.view(ref.rows, ref.cols)
        row_bytes = max(ref.nbytes // max(ref.rows, 1), 1)
        block = max(1, self.buffer_bytes // row_bytes)
        for r0, r1 in row_blocks(ref, 0, ref.rows, block):
            flat[r0:r1].copy_(to_device_float(self._rows(ref, r0, r1), self.device))

    def gather_rows(self, ref: TensorRef, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (sorted unique int64) of a 2-D tensor, as [len(ids), cols] on the device."""
        out = torch.empty(len(ids), ref.cols, dtype=dtype, device=self.device.torch)
        ids_list = ids.tolist()
        start = 0
        while start < len(ids_list):  # contiguous runs of ids are read in one call
            stop = start + 1
            while stop < len(ids_list) and ids_list[stop] == ids_list[stop - 1] + 1:
                stop += 1
            r0 = ids_list[start]
            out[start:stop].copy_(
                to_device_float(self._rows(ref, r0, r0 + stop - start), self.device)
            )
            start = stop
        return out

    def load_state(
        self,
        plan: dict[str, list[Piece]],
        expected: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        keep_fp32: tuple[str, ...] = (),
    ) -> dict[str, torch.Tensor]:
        """Allocate each module tensor on the device and fill it from its pieces."""
        state: dict[str, torch.Tensor] = {}
        dev = self.device.torch
        for key, shape in expected.items():
            want = torch.float32 if keep_fp32 and key.endswith(keep_fp32) else dtype
            pieces = plan.get(key)
            if pieces is None:  # an optional buffer the checkpoint does not store
                state[key] = torch.zeros(shape, dtype=want, device=dev)
                continue
            dst = torch.empty(shape, dtype=want, device=dev)
            for p in pieces:
                view = dst if p.expert is None else dst[p.expert]
                if p.half is not None:
                    half = view.shape[0] // 2
                    view = view[p.half * half : (p.half + 1) * half]
                self.fill(p.ref, view)
            state[key] = dst
        return state
