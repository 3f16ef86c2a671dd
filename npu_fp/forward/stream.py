"""The layer-streamed executor and the norm recording.

Hidden states of a pass (a few batches) stay on the device; the layers go through one block at a
time: built from the checkpoint, applied to every batch of the pass, freed. Memory is therefore one
block of weights plus the pass's activations, whatever the depth. With `keep_all` (the pipeline's
resident mode, chosen when a rank's stage fits its budget) the blocks stay until the run ends, so
each layer is read from the checkpoint once however many passes there are.

Per batch, layer and stream the recorder stores sufficient statistics of the per-token L2 norms
(computed in fp32 on the device, summed in float64 on the host with numpy's pairwise sum): token
count, sum, sum of squares over the finite norms, and the NaN / Inf token counts. Each (batch, layer,
stream) slot has exactly one writer, so tables from several ranks add up exactly, and the final sum
over batches runs in batch order on rank 0: results do not depend on the number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from npu_fp.forward.layers import StreamModel, call_layer

log = logging.getLogger(__name__)

STREAMS = ("residual", "attn", "mlp")
FIELDS = ("count", "sum", "sumsq", "nan", "inf")


@dataclass
class NormTables:
    norms: torch.Tensor  # float64 [num_batches, num_layers, len(STREAMS), len(FIELDS)]
    routing: torch.Tensor  # int64 [num_layers, max_experts]: tokens routed to each expert

    @classmethod
    def zeros(cls, num_batches: int, num_layers: int, max_experts: int) -> NormTables:
        return cls(
            torch.zeros(num_batches, num_layers, len(STREAMS), len(FIELDS), dtype=torch.float64),
            torch.zeros(num_layers, max(max_experts, 1), dtype=torch.int64),
        )

    def totals(self) -> torch.Tensor:
        """[num_layers, streams, fields]: the batch slots summed in batch order (deterministic)."""
        acc = torch.zeros(self.norms.shape[1:], dtype=torch.float64)
        for b in range(self.norms.shape[0]):
            acc += self.norms[b]
        return acc


def norm_stats(x: torch.Tensor) -> torch.Tensor:
    """float64 [count, sum, sumsq, nan, inf] of the per-token L2 norms of x [..., H]."""
    n = torch.linalg.vector_norm(x.float(), dim=-1).reshape(-1).cpu().numpy().astype(np.float64)
    finite = n[np.isfinite(n)]
    nan = int(np.isnan(n).sum())
    return torch.tensor(
        [n.size, finite.sum(), (finite * finite).sum(), nan, n.size - finite.size - nan],
        dtype=torch.float64,
    )


class Recorder:
    """Forward hooks that write norms and routing counts for the (batch, layer) being run."""

    def __init__(self, tables: NormTables) -> None:
        self.tables = tables
        self.batch = -1
        self.layer = -1

    def record(self, stream: str, x: torch.Tensor) -> None:
        self.tables.norms[self.batch, self.layer, STREAMS.index(stream)] = norm_stats(x)

    def route(self, top_k_index: torch.Tensor) -> None:
        row = self.tables.routing[self.layer]
        counts = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=row.numel())
        row += counts[: row.numel()]

    def attach(self, layer: nn.Module, attn_path: str, mlp_path: str) -> list:
        def branch(stream: str) -> Callable:
            def hook(_mod: nn.Module, _args: object, out: object) -> None:
                self.record(stream, out[0] if isinstance(out, tuple) else out)

            return hook

        def experts_pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.route(args[1] if len(args) > 1 else kwargs["top_k_index"])

        handles = [
            layer.get_submodule(attn_path).register_forward_hook(branch("attn")),
            layer.get_submodule(mlp_path).register_forward_hook(branch("mlp")),
        ]
        for name, mod in layer.named_modules():
            if name.endswith("experts") and hasattr(mod, "gate_up_proj"):
                handles.append(mod.register_forward_pre_hook(experts_pre, with_kwargs=True))
        return handles


def module_bytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])


class LayerStreamer:
    """Runs a range of layers over a pass of hidden states, one block of layers at a time."""

    def __init__(
        self,
        model: StreamModel,
        tables: NormTables,
        layers_per_block: int,
        capture: Callable[[int, int, torch.Tensor], None] | None = None,
        keep_all: bool = False,
    ) -> None:
        self.model = model
        self.recorder = Recorder(tables)
        self.layers_per_block = layers_per_block
        self.capture = capture
        # keep_all: every block built stays on the device until release(), so a rank whose layers
        # fit reads them from the checkpoint once per run instead of once per pass
        self.keep_all = keep_all
        self._blocks: dict[tuple[int, ...], list[nn.Module]] = {}
        self.peak_weight_bytes = 0  # most layer weight bytes alive at once
        self.peak_hidden_bytes = 0
        self.layers_built = 0
        self.layer_bytes_read = 0  # checkpoint bytes read to build layers (embeddings excluded)

    def _block(self, block: tuple[int, ...]) -> list[nn.Module]:
        if block in self._blocks:
            return self._blocks[block]
        if not self.keep_all:
            self.release()  # the old block goes before the new one is read
        fam = self.model.family
        mods = []
        before = self.model.reader.bytes_read
        for i in block:
            mod = self.model.build_layer(i)
            self.recorder.attach(mod, fam.attn_path, fam.mlp_path)
            mods.append(mod)
            self.layers_built += 1
        self.layer_bytes_read += self.model.reader.bytes_read - before
        self._blocks[block] = mods
        alive = sum(module_bytes(m) for ms in self._blocks.values() for m in ms)
        self.peak_weight_bytes = max(self.peak_weight_bytes, alive)
        return mods

    def release(self) -> None:
        self._blocks.clear()

    def run(self, hidden: list[torch.Tensor], batch_slots: Sequence[int], layers: range) -> None:
        """Apply `layers` to every hidden state of the pass, in place in the list."""
        if not hidden:
            return
        self.peak_hidden_bytes = max(
            self.peak_hidden_bytes, sum(h.numel() * h.element_size() for h in hidden)
        )
        rec = self.recorder
        step = self.layers_per_block
        with torch.no_grad():
            for start in range(layers.start, layers.stop, step):
                block = tuple(range(start, min(start + step, layers.stop)))
                mods = self._block(block)
                for j, slot in enumerate(batch_slots):
                    h = hidden[j]
                    b, t = h.shape[0], h.shape[1]
                    for i, mod in zip(block, mods, strict=True):
                        rec.batch, rec.layer = slot, i
                        h = call_layer(mod, h, self.model.layer_kwargs(i, b, t))
                        rec.record("residual", h)
                        if self.capture is not None:
                            self.capture(slot, i, h)
                    hidden[j] = h
        if not self.keep_all and len(range(layers.start, layers.stop, step)) > 1:
            self.release()  # several blocks: the next pass streams them again from the first
