"""How stored GGUF rows become values: dequantisation and the edits llama.cpp's converter made.

A `TensorRef` with a `RowCodec` is read by byte range like any other tensor, but its rows are
decoded on read (reader.py): ggml block types through the `gguf` library's dequantizers, plain
types through a numpy view. Two converter edits are undone so a GGUF copy lines up with its
Hugging Face original (reference/real-weights.md): llama.cpp interleaves the RoPE halves of the
rows of `attn_q` / `attn_k` for the llama architecture, and it folds Gemma's `(1 + w)` norm
offset into the stored gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ggml types that are not block-quantized, read through a numpy view (ggml type name -> dtype)
PLAIN_TYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}


@dataclass(frozen=True, slots=True)
class RowCodec:
    """Decoding of one GGUF tensor's rows (a row is the last dimension: whole ggml blocks)."""

    ggml_type: int  # gguf.GGMLQuantizationType value
    type_name: str  # "Q4_1", "Q8_0", "F32", ...
    rope_heads: int = 0  # > 0: undo llama.cpp's q/k row interleave over this many heads
    offset: float = 0.0  # added after decoding (-1 undoes the +1 folded into Gemma norm gains)

    def window(self, rows: int, row_begin: int, row_end: int) -> tuple[int, int]:
        """Stored rows to read for logical rows [row_begin, row_end): whole heads when the
        rows are permuted within heads, else the same rows."""
        if not self.rope_heads:
            return row_begin, row_end
        d = rows // self.rope_heads
        return row_begin // d * d, -(-row_end // d) * d


def decode_rows(codec: RowCodec, raw: np.ndarray, rows: int) -> np.ndarray:
    """float32 [n, cols] values of n stored rows (whole heads when permuted) of a tensor with
    `rows` rows; `raw` is their bytes as uint8 [n, row_bytes]."""
    plain = PLAIN_TYPES.get(codec.type_name)
    if plain is not None:
        values = raw.view(plain).astype(np.float32)
    else:
        import gguf  # optional dependency (the gguf extra): only GGUF inputs need it

        # NaN / Inf scales are data (counted per tensor by the kernel), not a numpy warning
        with np.errstate(invalid="ignore", over="ignore"):
            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(codec.ggml_type))
        values = np.asarray(values, dtype=np.float32)
    if codec.rope_heads:
        values = unpermute_rope(values, len(values) // (rows // codec.rope_heads))
    if codec.offset:
        values = values + np.float32(codec.offset)
    return np.ascontiguousarray(values)


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of `heads` whole heads: its converter interleaves
    the RoPE halves, so stored row (head, i, half) holds HF row (head, half, i)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
