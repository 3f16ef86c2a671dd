"""A checkpoint seen through its roles: find one layer's matrices and read them, one at a time.

Comparisons never load a model whole: a `ModelView` holds only headers and the role map, and each
read returns one tensor (or one fused part, or selected rows of the embedding) as float32 in the
`[out, in]` orientation, whatever the checkpoint stores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from npu_fp.arch import map_roles
from npu_fp.arch.base import PartSpec, RoleMap
from npu_fp.io.reader import FileCache, RowReader, block_row_bytes, row_blocks, scale_for
from npu_fp.io.safetensors_header import CheckpointError, TensorRef
from npu_fp.io.source import ModelSource, member, open_model
from npu_fp.io.validate import (
    TOKENIZER_MAX_BYTES,
    InputError,
    exists,
    loads_json,
    parse_vocab,
    read_regular,
)

log = logging.getLogger(__name__)

Key = tuple[int | None, str, int | None]  # (layer, role, expert)
READ_BUFFER = 32 << 20
PLAIN_FLOATS = frozenset({"BF16", "F16", "F32", "F64"})


@dataclass
class ModelView:
    source: ModelSource
    rolemap: RoleMap
    index: dict[Key, tuple[str, PartSpec | None]]
    vocab: dict[str, int] | None  # token string -> id, from tokenizer.json / vocab.json
    vocab_note: str
    _files: FileCache = field(default_factory=FileCache)
    _reader: RowReader | None = None

    @property
    def root(self) -> str:
        return self.source.root

    @property
    def num_layers(self) -> int:
        return self.rolemap.num_layers

    @property
    def num_experts(self) -> int:
        return self.rolemap.num_experts

    def has(self, layer: int | None, role: str, expert: int | None = None) -> bool:
        return (layer, role, expert) in self.index

    def experts(self, layer: int) -> list[int]:
        return sorted(
            {
                k[2]
                for k in self.index
                if k[0] == layer and k[1] == "moe.expert.gate" and k[2] is not None
            }
        )

    def group_of(self, layer: int, expert: int) -> int | None:
        name, _ = self.index[(layer, "moe.expert.gate", expert)]
        return self.rolemap.roles[name].group

    def shape(
        self, layer: int | None, role: str, expert: int | None = None
    ) -> tuple[int, int] | None:
        """[out, in] shape of the role (a fused part's own extent), None when absent or not 2-D."""
        entry = self.index.get((layer, role, expert))
        if entry is None:
            return None
        name, part = entry
        ref, tr = self.source.tensors[name], self.rolemap.roles[name]
        if len(ref.shape) != 2:
            return None
        rows, cols = ref.shape
        if part is not None:
            rows, cols = (part.size(), cols) if part.dim == 0 else (rows, part.size())
        return (cols, rows) if tr.transposed else (rows, cols)

    def nbytes(self, layer: int | None, role: str, expert: int | None = None) -> int:
        entry = self.index.get((layer, role, expert))
        return 0 if entry is None else self.source.tensors[entry[0]].nbytes

    def layer_bytes(self, layer: int) -> int:
        return sum(
            self.source.tensors[name].nbytes
            for (lay, _, _), (name, part) in self.index.items()
            if lay == layer and part is None
        )

    def ref(self, layer: int | None, role: str, expert: int | None = None) -> TensorRef | None:
        entry = self.index.get((layer, role, expert))
        return None if entry is None else self.source.tensors[entry[0]]

    def _rows(self, ref: TensorRef, r0: int, r1: int, keep_dtype: bool = False) -> torch.Tensor:
        """Rows [r0, r1) as float32 (or, with `keep_dtype`, the stored bf16 / fp16 / fp32),
        copied exactly once out of the mapped window (the window is reused by the next read)."""
        if self._reader is None:
            self._reader = RowReader(self._files)
        x = self._reader.read(ref, r0, r1)
        scale = scale_for(self.source.tensors, ref)
        x = self._reader.widen(ref, x, r0, scale)
        if keep_dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
            return x.clone()
        return x.to(torch.float32, copy=True)

    def read(
        self, layer: int | None, role: str, expert: int | None = None, keep_dtype: bool = False
    ) -> torch.Tensor | None:
        """The role's matrix, float32 [out, in] on the host (with `keep_dtype`, in its stored
        float dtype); None when the model lacks it."""
        entry = self.index.get((layer, role, expert))
        if entry is None:
            return None
        name, part = entry
        ref, tr = self.source.tensors[name], self.rolemap.roles[name]
        x = self._rows(ref, 0, ref.rows, keep_dtype).reshape(ref.shape) if ref.shape else None
        if x is None:
            return None
        if part is not None:
            idx = torch.cat([torch.arange(a, b) for a, b in part.ranges])
            x = x.index_select(part.dim, idx)
        return x.t().contiguous() if tr.transposed and x.ndim == 2 else x

    def read_rows(self, role: str, ids: list[int]) -> torch.Tensor | None:
        """Selected rows of a [vocab, hidden] global tensor, streamed block by block."""
        entry = self.index.get((None, role, None))
        if entry is None or self.rolemap.roles[entry[0]].transposed:
            return None
        ref = self.source.tensors[entry[0]]
        if len(ref.shape) != 2:
            return None
        want = torch.tensor(ids, dtype=torch.long)
        order = torch.argsort(want)
        out = torch.empty(len(ids), ref.shape[1], dtype=torch.float32)
        block = max(1, READ_BUFFER // max(block_row_bytes(ref), 1))
        sorted_ids = want[order]
        start = 0
        for r0, r1 in row_blocks(ref, 0, ref.rows, block):
            stop = int(torch.searchsorted(sorted_ids, r1))
            if stop > start:
                out[order[start:stop]] = self._picked_rows(ref, r0, r1, sorted_ids[start:stop] - r0)
            start = stop
        return out

    def _picked_rows(self, ref: TensorRef, r0: int, r1: int, pick: torch.Tensor) -> torch.Tensor:
        """Rows `pick` (relative to r0) of block [r0, r1) as float32: plain floats are picked
        from the mapped window and only those rows widened (8,192 of a 152k-row embedding),
        other dtypes (FP8 block scales, unsigned ints) are widened by block first."""
        if ref.dtype in PLAIN_FLOATS:
            if self._reader is None:
                self._reader = RowReader(self._files)
            return self._reader.read(ref, r0, r1)[pick].to(torch.float32)
        return self._rows(ref, r0, r1)[pick]

    def close(self) -> None:
        self._files.close()
        self._reader = None


def build_index(rolemap: RoleMap) -> dict[Key, tuple[str, PartSpec | None]]:
    """(layer, role, expert) -> (tensor name, part); whole tensors win over fused parts."""
    index: dict[Key, tuple[str, PartSpec | None]] = {}
    for name, tr in sorted(rolemap.roles.items()):
        if tr.kind != "weight":
            continue
        for part in tr.parts:
            index.setdefault((tr.layer, part.role, tr.expert), (name, part))
    for name, tr in sorted(rolemap.roles.items()):
        if tr.kind == "weight" and tr.role != "other":
            index[(tr.layer, tr.role, tr.expert)] = (name, None)
    return index


def read_vocab(root: str | Path) -> tuple[dict[str, int] | None, str]:
    """Token string -> id from tokenizer.json (any model type) or vocab.json; (None, why) if absent
    or unusable. A tokenizer file that is not a regular file inside the model folder is an error."""
    root = Path(root)
    for name in ("tokenizer.json", "vocab.json"):
        if not exists(root / name):
            continue
        path = member(root, name, str(root))
        try:  # a FIFO, an unreadable or an oversized file stops the job with a named error
            raw = read_regular(path, TOKENIZER_MAX_BYTES, name)
        except InputError as e:
            raise CheckpointError(str(e)) from None
        try:  # bad content only costs the embedding-aligned tests, with the reason reported
            doc = loads_json(raw, str(path))
        except InputError as e:
            return None, f"unreadable {name} ({e})"
        return parse_vocab(doc, str(path), name)
    return None, f"{root}: no tokenizer.json or vocab.json"


def stored_vocab(source: ModelSource) -> tuple[dict[str, int] | None, str]:
    """The vocabulary a weights file carries (GGUF `tokenizer.ggml.tokens`, id = position; a
    repeated token keeps its first id), checked like a tokenizer.json."""
    assert source.tokens is not None
    ids: dict[str, int] = {}
    for i, token in enumerate(source.tokens):
        ids.setdefault(token, i)
    return parse_vocab({"model": {"vocab": ids}}, f"{source.root}: tokenizer.ggml.tokens")


def open_view(path: str, lm_prefix: str | None = None) -> ModelView:
    source = open_model(path)
    shapes = {n: r.shape for n, r in source.tensors.items()}
    rolemap = map_roles(source.config, shapes, lm_prefix)
    if source.tokens is not None:
        vocab, note = stored_vocab(source)
    else:
        vocab, note = read_vocab(source.root)
    return ModelView(source, rolemap, build_index(rolemap), vocab, note)
