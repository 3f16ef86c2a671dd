"""GGUF files (llama.cpp): one file is one model, read through the `gguf` library's GGUFReader.

GGUFReader maps the file and parses the header; every tensor becomes a `TensorRef` over its byte
range, with a `RowCodec` when its rows must be decoded on read (ggml block quantisation, or a
converter edit to undo: gguf_codec.py). The config that config.json would give is built from the
`{arch}.*` metadata, and the vocabulary comes from `tokenizer.ggml.tokens`.

Bad input is refused before any tensor is read: a header that runs past the end of the file, an
unknown or undecodable ggml type, a row that is not whole blocks, data outside the file or
overlapping another tensor, missing or mistyped metadata; each a `CheckpointError` naming the
file and, where there is one, the tensor.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npu_fp.io.gguf_codec import PLAIN_TYPES, RowCodec
from npu_fp.io.safetensors_header import (
    MAX_INT,
    MAX_TENSORS,
    CheckpointError,
    TensorRef,
    open_checkpoint,
)

# general.architecture -> (Hugging Face architectures[0], model_type); the arch registry maps
# GGUF tensor names for these (arch/gguf.py). Mixtral files say "llama" and carry experts.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
MIXTRAL = ("MixtralForCausalLM", "mixtral")
# llama.cpp's converter permutes q/k rows for its RoPE layout only for these (LlamaModel.permute)
ROPE_PERMUTED = frozenset({"llama"})
# ... and adds 1 to every RMSNorm gain of these (Gemma computes x * (1 + w))
NORM_FOLDED = frozenset({"gemma", "gemma2", "gemma3"})
_QK = re.compile(r"^blk\.\d+\.attn_(q|k)\.weight$")
GGML_MAX_DIMS = 4
# llama.cpp's gguf-split names (llama_split_path): NAME-00001-of-00003.gguf
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_SHARDS = 10_000

# config.json key <- "{arch}." metadata key (integers)
_INT_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "intermediate_size": "feed_forward_length",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "num_experts_per_tok": "expert_used_count",
    "max_position_embeddings": "context_length",
}
_FLOAT_KEYS = {
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class GGUFContents:
    path: str  # the file given (the first shard of a split model)
    # (file name, size, sha256 of the bytes before its data region) per file, shards in order
    files: tuple[tuple[str, int, str], ...]
    config: dict[str, Any]
    config_sha256: str
    tensors: dict[str, TensorRef]
    tokens: tuple[str, ...] | None  # tokenizer.ggml.tokens, id = position
    metadata: dict[str, str]


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf"


@functools.cache
def _reader_class() -> type:
    """GGUFReader with every read bounded by the file and every tensor info checked by name.

    GGUFReader slices its memmap without checking the end, so a truncated header yields short
    arrays that fail later with unrelated errors, or an array length that loops for ever; one
    check in `_get`, its single read primitive, makes every read past the end a named error. The
    tensor infos are checked before GGUFReader builds its views, so a bad type or range names
    the tensor (GGUFReader's own errors do not).
    """
    import gguf  # optional dependency (the gguf extra): only GGUF inputs need it

    class BoundedReader(gguf.GGUFReader):
        _flat: np.ndarray | None = None

        def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
            # GGUFReader._get, on a plain ndarray view of the map: slicing the np.memmap itself
            # costs more than the read (__array_finalize__ per slice), and gemma-3's 262k-token
            # vocabulary takes a million reads (GGUFReader 19.7 s, this 6.3 s, measured here)
            if self._flat is None:
                self._flat = self.data.view(np.ndarray)
            offset, count = int(offset), int(count)
            dtype = np.dtype(dtype)
            end = offset + dtype.itemsize * count
            if end > len(self._flat):
                raise CheckpointError(
                    f"{self.data.filename}: GGUF header runs past the end of the file "
                    f"({len(self._flat)} bytes) at byte {offset}; truncated or corrupt"
                )
            arr = self._flat[offset:end].view(dtype)
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

        def _build_tensors(self, start_offs, fields):  # type: ignore[override]
            if len(fields) > MAX_TENSORS:
                raise CheckpointError(
                    f"{self.data.filename}: {len(fields)} tensors; at most {MAX_TENSORS} expected"
                )
            spans = []
            for field in fields:
                spans.append(_check_info(self.data.filename, len(self.data), start_offs, field))
            _check_overlaps(self.data.filename, spans)
            super()._build_tensors(start_offs, fields)

    return BoundedReader


@functools.cache
def _decodable(ggml_type: int) -> bool:
    """Whether this gguf release dequantizes the type (probed on one zero block)."""
    import gguf  # optional dependency (the gguf extra): only GGUF inputs need it

    qtype = gguf.GGMLQuantizationType(ggml_type)
    if qtype.name in PLAIN_TYPES:
        return True
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_info(path: str, size: int, start_offs: int, field: Any) -> tuple[int, int, str]:
    """One tensor info: known decodable type, dimensions, whole blocks, data inside the file."""
    import gguf  # optional dependency (the gguf extra): only GGUF inputs need it

    _, name_data, n_dims, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", "replace")[:200]
    where = f"{path}: tensor {name!r}"
    if int(n_dims[0]) > GGML_MAX_DIMS:
        raise CheckpointError(f"{where}: {int(n_dims[0])} dimensions; ggml allows at most 4")
    raw = int(raw_type[0])
    try:
        qtype = gguf.GGMLQuantizationType(raw)
    except ValueError:
        known = ", ".join(t.name for t in gguf.GGMLQuantizationType)
        raise CheckpointError(
            f"{where}: unknown ggml quantization type {raw}; gguf {_version()} knows {known}"
        ) from None
    if not _decodable(raw):
        raise CheckpointError(
            f"{where}: ggml type {qtype.name} cannot be dequantized by gguf {_version()}; "
            "convert the file to a type it reads (e.g. Q8_0) or upgrade gguf"
        )
    ne = [int(d) for d in dims]
    numel = math.prod(ne)
    if numel > MAX_INT or any(d > MAX_INT for d in ne):
        raise CheckpointError(f"{where}: shape {ne[::-1]} overflows the element count")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if ne and ne[0] % block:
        raise CheckpointError(
            f"{where}: rows of {ne[0]} values are not whole {qtype.name} blocks of {block}"
        )
    nbytes = numel * type_size // block
    rel = int(offset[0])
    begin = start_offs + rel
    if begin + nbytes > size:
        raise CheckpointError(
            f"{where}: {qtype.name} {ne[::-1]} needs bytes [{begin}, {begin + nbytes}) but the "
            f"file holds {size}; truncated"
        )
    return begin, begin + nbytes, name


def _check_overlaps(path: str, spans: list[tuple[int, int, str]]) -> None:
    spans = sorted(spans)
    for (_, end, prev), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the data of tensor {prev!r}")


@functools.cache
def _version() -> str:
    return importlib.metadata.version("gguf")  # only for error messages


def _open_reader(path: str) -> Any:
    fd = open_checkpoint(path, "GGUF file")  # refuses FIFOs and devices without blocking
    os.close(fd)
    try:
        import gguf  # noqa: F401  optional dependency: checked here for a clear message
    except ImportError:
        raise CheckpointError(
            f"{path}: reading GGUF needs the gguf package: pip install 'npu_fp[gguf]'"
        ) from None
    try:
        return _reader_class()(path)
    except CheckpointError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None


class _Metadata:
    def __init__(self, path: str, reader: Any) -> None:
        self.path, self.fields = path, reader.fields

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        field = self.fields.get(key)
        if field is None:
            return None
        try:
            value = field.contents()
        except (ValueError, IndexError, TypeError) as e:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} unreadable: {e}") from None
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(
                f"{self.path}: GGUF metadata {key!r} must be {getattr(kind, '__name__', kind)}, "
                f"got {type(value).__name__}"
            )
        return value


def _build_config(meta: _Metadata, arch: str, names: set[str], vocab: int) -> dict[str, Any]:
    experts = meta.get(f"{arch}.expert_count", int) or 0
    hf_arch, model_type = MIXTRAL if arch == "llama" and experts else ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "gguf_architecture": arch,  # tells the arch registry to map GGUF tensor names
    }
    for key, gkey in _INT_KEYS.items():
        value = meta.get(f"{arch}.{gkey}", int)
        if value is not None:
            config[key] = value
    for key, gkey in _FLOAT_KEYS.items():
        value = meta.get(f"{arch}.{gkey}", (float, int))
        if value is not None:
            config[key] = float(value)
    missing = [f"{arch}.{_INT_KEYS[k]}" for k in _REQUIRED if k not in config]
    if missing:
        raise CheckpointError(f"{meta.path}: GGUF metadata lacks {', '.join(missing)}")
    if experts:
        config["num_local_experts" if model_type == "mixtral" else "num_experts"] = experts
    config["vocab_size"] = vocab or meta.get(f"{arch}.vocab_size", int)
    config["tie_word_embeddings"] = "output.weight" not in names
    return config


def _codec(
    path: str, arch: str, name: str, type_name: str, ggml_type: int, shape: tuple, config: dict
) -> RowCodec | None:
    heads = 0
    if arch in ROPE_PERMUTED and (m := _QK.match(name)):
        key = "num_attention_heads" if m.group(1) == "q" else "num_key_value_heads"
        heads = config.get(key) or config["num_attention_heads"]
        if len(shape) != 2 or shape[0] % heads or (shape[0] // heads) % 2:
            raise CheckpointError(
                f"{path}: tensor {name!r}: shape {list(shape)} is not {heads} heads of an even "
                f"head size ({key}={heads}); the RoPE row order cannot be undone"
            )
    offset = -1.0 if arch in NORM_FOLDED and name.endswith("norm.weight") else 0.0
    quantized = type_name not in PLAIN_TYPES and type_name != "BF16"
    if quantized and len(shape) < 2:
        raise CheckpointError(
            f"{path}: tensor {name!r}: a 1-D {type_name} tensor cannot be read by rows; "
            "not supported"
        )
    if not (quantized or heads or offset):
        return None  # read like a safetensors tensor of the same dtype
    return RowCodec(ggml_type, type_name, heads, offset)


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """The model in one GGUF file, or in the shards of a split one (`NAME-00001-of-00003.gguf`,
    llama.cpp's gguf-split: pass the first). Parsing a large vocabulary takes seconds (6 s for
    gemma-3's 262,144 tokens here), and a compare opens each model several times: the result is
    kept while the files stay the same (path, size, mtime, inode)."""
    path = str(Path(path).absolute())
    stats = []
    shards = _shard_paths(path)
    for shard in shards:
        try:
            st = os.stat(shard)
        except OSError as e:
            split = f"; {Path(path).name} names a split of {len(shards)} GGUF shards"
            raise CheckpointError(
                f"{shard}: cannot stat: {e.strerror}{split if len(shards) > 1 else ''}"
            ) from e
        stats.append((shard, st.st_size, st.st_mtime_ns, st.st_ino))
    return _read_gguf(path, tuple(stats))


def _shard_paths(path: str) -> list[str]:
    """The files of the model named by `path`: itself, or every shard of its split."""
    m = _SHARD.match(Path(path).name)
    if m is None:
        return [path]
    count = int(m["count"])
    if count < 1 or count > MAX_SHARDS:
        raise CheckpointError(f"{path}: a split of {count} GGUF shards; 1 to {MAX_SHARDS} expected")
    return [
        str(Path(path).with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf"))
        for i in range(1, count + 1)
    ]


# older llama.cpp conversions (Mixtral before the `_exps` stacks) store each expert on its own:
# `blk.N.ffn_gate.E.weight`; named here like one expert of a stack (io/expert_stacks.py), so the
# two layouts of one model share names and roles
_OLD_EXPERT = re.compile(r"^(?P<blk>blk\.\d+)\.(?P<leaf>ffn_(?:gate|up|down))\.(?P<e>\d+)\.weight$")


def _per_expert_name(name: str) -> str:
    m = _OLD_EXPERT.match(name)
    return f"{m['blk']}.experts.{int(m['e'])}.{m['leaf']}.weight" if m else name


@functools.lru_cache(maxsize=8)
def _read_gguf(path: str, shard_stats: tuple[tuple[str, int, int, int], ...]) -> GGUFContents:
    reader = _open_reader(path)
    meta = _Metadata(path, reader)
    shards = [path]
    split = meta.get("split.count", int)
    if split is not None and split > 1:
        shards = [s[0] for s in shard_stats]
        if len(shards) != split or shards[0] != path:
            raise CheckpointError(
                f"{path}: GGUF metadata split.count={split}: pass the first of the {split} "
                f"shards, named NAME-00001-of-{split:05d}.gguf"
            )
    readers = [reader] + [_open_reader(shard) for shard in shards[1:]]
    for i, (shard, r) in enumerate(zip(shards, readers, strict=True)):
        no = _Metadata(shard, r).get("split.no", int)
        if len(shards) > 1 and no != i:
            raise CheckpointError(f"{shard}: GGUF metadata split.no={no}; shard {i} expected")
    arch = meta.get("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not mapped; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    tokens = meta.get("tokenizer.ggml.tokens", list)
    if tokens is not None and not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' must be strings")
    infos = [(shard, t) for shard, r in zip(shards, readers, strict=True) for t in r.tensors]
    config = _build_config(meta, arch, {t.name for _, t in infos}, len(tokens or ()))
    tensors: dict[str, TensorRef] = {}
    for shard, t in infos:
        name = _per_expert_name(t.name)
        if name in tensors:
            raise CheckpointError(
                f"{shard}: tensor {t.name!r} is also stored in {Path(tensors[name].file).name}"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        type_name = t.tensor_type.name
        codec = _codec(shard, arch, t.name, type_name, int(t.tensor_type), shape, config)
        begin = int(t.data_offset)
        tensors[name] = TensorRef(
            name, shard, type_name, shape, begin, begin + t.n_bytes, codec=codec
        )
    files = tuple(
        (Path(shard).name, len(r.data), hashlib.sha256(bytes(r.data[: r.data_offset])).hexdigest())
        for shard, r in zip(shards, readers, strict=True)
    )
    canon = json.dumps(config, sort_keys=True).encode()
    return GGUFContents(
        path=path,
        files=files,
        config=config,
        config_sha256=hashlib.sha256(canon).hexdigest(),
        tensors=dict(sorted(tensors.items())),
        tokens=tuple(tokens) if tokens is not None else None,
        metadata={"format": "gguf", "gguf.architecture": arch},
    )
