"""Model folders: single-file, sharded (with index) or Hugging Face cache, read offline.

`open_model(path)` reads config.json and every shard's header, never tensor data, and returns a
`ModelSource`: the tensors by name with their byte ranges, and the files with their sizes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npu_fp.io.expert_stacks import split_stacks
from npu_fp.io.gguf_file import is_gguf, read_gguf
from npu_fp.io.mindspore_ckpt import read_ckpt_header
from npu_fp.io.safetensors_header import (
    MAX_TENSORS,
    CheckpointError,
    FileHeader,
    TensorRef,
    read_header,
)
from npu_fp.io.torch_bin import read_torch_header
from npu_fp.io.validate import (
    CONFIG_MAX_BYTES,
    INDEX_MAX_BYTES,
    SMALL_MAX_BYTES,
    InputError,
    check_config,
    contained,
    exists,
    is_regular,
    load_json_object,
    loads_json,
    model_roots,
    read_regular,
)

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


# --- weight formats: one per model folder (torch .bin / MindSpore .ckpt: issue 8 part A) ---
@dataclass(frozen=True, slots=True)
class WeightFormat:
    name: str
    suffixes: tuple[str, ...]
    single: str | None  # the file name of an unsharded checkpoint
    index: str | None  # the shard index, when the format has one
    read: Callable[[str], FileHeader]  # one file's tensors by byte range, no data read
    many: bool = True  # several files without an index are shards of one model


FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat("safetensors", (".safetensors",), "model.safetensors", INDEX_NAME, read_header),
    WeightFormat(
        "torch",
        (".bin", ".pt", ".pth"),
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        read_torch_header,
    ),
    # a folder of .ckpt files is usually several training steps, never shards of one model
    WeightFormat("mindspore", (".ckpt",), None, None, read_ckpt_header, many=False),
)
# what Hugging Face Trainer leaves beside the weights: pickles of other things, not shards
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})


def _weight_files(root: Path, fmt: WeightFormat) -> list[str]:
    names = [
        p.name
        for p in root.iterdir()
        if p.suffix in fmt.suffixes
        and p.name not in NOT_WEIGHTS
        and not p.name.startswith("rng_state")
    ]
    return sorted(names) + ([fmt.index] if fmt.index and exists(root / fmt.index) else [])


def weight_format(root: Path) -> WeightFormat:
    """The one format a model folder's weights are stored in.

    Hugging Face repos often ship a complete safetensors set beside `pytorch_model*.bin`: the
    safetensors set is read then (logged at INFO). Any other mix, or a safetensors set that is
    incomplete, is refused: reading one of them would be a guess.
    """
    found = {f: _weight_files(root, f) for f in FORMATS}
    present = [f for f, names in found.items() if names]
    if len(present) > 1:
        listing = "; ".join(f"{f.name}: {', '.join(found[f][:3])}" for f in present)
        safetensors, torch_bin = FORMATS[0], FORMATS[1]
        why = ""
        if set(present) == {safetensors, torch_bin}:
            missing = _safetensors_set_missing(root)
            if not missing:
                log.info(
                    "%s: reading the complete safetensors set (%s); ignoring the PyTorch files "
                    "beside it (%s)",
                    root,
                    ", ".join(found[safetensors][:3]),
                    ", ".join(found[torch_bin][:3]),
                )
                return safetensors
            why = f" (the safetensors set is incomplete: {missing})"
        raise CheckpointError(
            f"{root}: holds weights in several formats ({listing}){why}; a model folder must "
            "hold one format, or a complete safetensors set beside PyTorch .bin files: move "
            "the other files out"
        )
    return present[0] if present else FORMATS[0]


def _safetensors_set_missing(root: Path) -> str:
    """Why the safetensors files of `root` are not one complete model ('' when they are): the
    shards its index names must all be there, or without an index `model.safetensors` must be."""
    index = root / INDEX_NAME
    if exists(index):
        gone = [n for n in _index_shards(root, index) if not exists(root / n)]
        return f"{INDEX_NAME} names missing shards {', '.join(gone[:3])}" if gone else ""
    if exists(root / "model.safetensors"):
        return ""
    return f"no {INDEX_NAME} and no model.safetensors"


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str  # path relative to the model folder
    size: int
    header_sha256: str  # digest of the header JSON: changes whenever names, shapes or layout change


def weight_path(root: str | os.PathLike[str], name: str) -> Path:
    """A weight file of the model at `root`: inside its folder, or beside a .gguf file root (the
    file itself, or another shard of its split)."""
    root = Path(root)
    return root.parent / name if root.is_file() else root / name


@dataclass(frozen=True, slots=True)
class ModelSource:
    root: str  # the resolved snapshot / model folder, or the .gguf file
    config: dict
    config_sha256: str
    tensors: dict[str, TensorRef]  # sorted by name; fused expert stacks one tensor per expert
    files: tuple[FileInfo, ...]
    metadata: dict[str, str]  # __metadata__ of the first file
    tokens: tuple[str, ...] | None = None  # vocabulary stored in the weights file (GGUF)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else str(self.config.get("model_type", "unknown"))


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """A model folder, or the snapshot a Hugging Face cache folder points at."""
    p = Path(path).expanduser()
    if not exists(p):
        raise CheckpointError(f"{p}: model path does not exist")
    if not p.is_dir():
        if p.suffix == ".safetensors" and is_regular(p):
            return p.parent.resolve()
        raise CheckpointError(
            f"{p}: expected a model folder or a .safetensors file (or a .gguf file)"
        )
    snapshots = p / "snapshots"
    if snapshots.is_dir() and not any(p.glob("*.safetensors")):
        ref_main = p / "refs" / "main"
        if exists(ref_main):
            rev = _read_small(ref_main).strip()
            # a revision is one folder name: anything else would point outside snapshots/
            if not rev or "/" in rev or "\\" in rev or rev in (".", ".."):
                raise CheckpointError(f"{ref_main}: expected a snapshot revision, got {rev[:80]!r}")
            if (snapshots / rev).is_dir():
                return (snapshots / rev).absolute()
        revs = sorted(d for d in snapshots.iterdir() if d.is_dir())
        if len(revs) == 1:
            return revs[0].absolute()
        if not revs:
            raise CheckpointError(f"{p}: Hugging Face cache folder has no snapshots")
        raise CheckpointError(
            f"{p}: {len(revs)} snapshots and no refs/main; pass one of "
            f"{[str(r) for r in revs]} as model.path"
        )
    # absolute() rather than resolve(): cache snapshots are symlink farms and must stay the root
    return p.absolute()


def _read_small(path: Path) -> str:
    try:
        return read_regular(path, SMALL_MAX_BYTES, "file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text") from e
    except InputError as e:
        raise CheckpointError(str(e)) from None


def member(root: Path, name: str, where: str) -> Path:
    """`root / name` after checking that it resolves inside the model folder or its cache repo."""
    try:
        contained(root / name, model_roots(root), where)
    except InputError as e:
        raise CheckpointError(str(e)) from None
    return root / name


def open_model(path: str | os.PathLike[str]) -> ModelSource:
    gguf_path = Path(path).expanduser()
    if is_gguf(gguf_path) and exists(gguf_path) and not gguf_path.is_dir():
        return _open_gguf(gguf_path)
    root = resolve_model_dir(path)
    config, config_sha = _read_config(root)
    fmt = weight_format(root)
    shard_names = _shard_names(root, fmt)
    headers: dict[str, FileHeader] = {}
    count = 0
    for name in shard_names:
        headers[name] = h = fmt.read(str(member(root, name, str(root))))
        count += len(h.tensors)
        if count > MAX_TENSORS:
            raise CheckpointError(
                f"{root}: more than {MAX_TENSORS} tensors; at most that many "
                "expected in one checkpoint"
            )
    tensors: dict[str, TensorRef] = {}
    for fname, h in headers.items():
        for ref in h.tensors:
            if ref.name in tensors:
                other = Path(tensors[ref.name].file).name
                raise CheckpointError(
                    f"{root}: duplicate tensor name {ref.name!r} in {fname} and {other}"
                )
            tensors[ref.name] = ref
    index = root / fmt.index if fmt.index else None
    if index is not None and exists(index):
        _check_index_agrees(root, index, tensors)
    tensors = split_stacks(tensors)
    if not tensors:
        raise CheckpointError(f"{root}: the checkpoint holds no tensors")
    try:
        check_config(config, str(root / "config.json"), (r.shape for r in tensors.values()))
    except InputError as e:
        raise CheckpointError(str(e)) from None
    files = tuple(
        FileInfo(name, h.size, hashlib.sha256(h.header_bytes).hexdigest())
        for name, h in headers.items()
    )
    first = headers[shard_names[0]]
    return ModelSource(
        root=str(root),
        config=config,
        config_sha256=config_sha,
        tensors=dict(sorted(tensors.items())),
        files=files,
        metadata=first.metadata,
    )


def _open_gguf(path: Path) -> ModelSource:
    """One .gguf file: config and vocabulary from its metadata (gguf_file.py)."""
    g = read_gguf(path)
    tensors = split_stacks(g.tensors)
    if not tensors:
        raise CheckpointError(f"{g.path}: the GGUF file holds no tensors")
    try:
        check_config(g.config, f"{g.path} (metadata)", (r.shape for r in tensors.values()))
    except InputError as e:
        raise CheckpointError(str(e)) from None
    return ModelSource(
        root=g.path,
        config=g.config,
        config_sha256=g.config_sha256,
        tensors=tensors,
        files=tuple(FileInfo(*f) for f in g.files),
        metadata=g.metadata,
        tokens=g.tokens,
    )


def _read_config(root: Path) -> tuple[dict, str]:
    cfg_path = root / "config.json"
    if not exists(cfg_path):
        ggufs = sorted(p.name for p in root.glob("*.gguf"))
        hint = f"; or pass one of the GGUF files {ggufs[:5]} as model.path" if ggufs else ""
        raise CheckpointError(
            f"{cfg_path}: missing; config.json tells the architecture and is required{hint}"
        )
    try:
        raw = read_regular(member(root, "config.json", str(root)), CONFIG_MAX_BYTES, "config.json")
        config = load_json_object_bytes(raw, cfg_path)
    except InputError as e:
        raise CheckpointError(str(e)) from None
    return config, hashlib.sha256(raw).hexdigest()


def load_json_object_bytes(raw: bytes, path: Path) -> dict:
    doc = loads_json(raw, str(path))
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(doc).__name__}")
    return doc


def _safe_member(index: Path, name: object, what: str) -> str:
    """A file name from an index must name a file inside the model folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: {what}: shard name must be a non-empty string")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{index}: {what} names {name[:200]!r}, a path outside the model folder"
        )
    return p.as_posix()


def _weight_map(root: Path, index: Path) -> dict[str, str]:
    try:
        data = load_json_object(member(root, index.name, str(root)), INDEX_MAX_BYTES, "index")
    except InputError as e:
        detail = str(e).removeprefix(f"{index}: ")
        raise CheckpointError(f"{index}: invalid index: {detail}") from None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: invalid index: 'weight_map' must be an object of "
            "tensor name -> shard file name"
        )
    return weight_map


def _index_shards(root: Path, index: Path) -> list[str]:
    weight_map = _weight_map(root, index)
    return sorted({_safe_member(index, v, f"tensor {k[:200]!r}") for k, v in weight_map.items()})


def _shard_names(root: Path, fmt: WeightFormat) -> list[str]:
    index = root / fmt.index if fmt.index else None
    if index is not None and exists(index):
        names = _index_shards(root, index)
        for n in names:
            if not exists(root / n):
                raise CheckpointError(f"{index}: names shard {n!r}, which is missing from {root}")
        return names
    if fmt.single and exists(root / fmt.single):
        return [fmt.single]
    names = [n for n in _weight_files(root, fmt) if n != fmt.index]
    if not names:
        raise CheckpointError(
            f"{root}: no model.safetensors, no {INDEX_NAME} and no *.safetensors files "
            "(nor pytorch_model.bin / *.bin / *.pt, nor one MindSpore *.ckpt)"
        )
    if len(names) > 1 and not fmt.many:
        raise CheckpointError(
            f"{root}: {len(names)} {fmt.name} files ({', '.join(names[:5])}); they are not "
            "shards of one model: keep one per model folder"
        )
    return names


def _check_index_agrees(root: Path, index: Path, tensors: dict[str, TensorRef]) -> None:
    weight_map = _weight_map(root, index)
    for name, shard in weight_map.items():
        ref = tensors.get(name)
        if ref is None:
            raise CheckpointError(
                f"{index}: tensor {name[:200]!r} is listed in {shard} but not stored there"
            )
        if Path(ref.file).name != Path(shard).name:
            raise CheckpointError(
                f"{index}: tensor {name!r} is listed in {shard} but stored in {Path(ref.file).name}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        log.warning(
            "%s: %d tensors are stored but not listed in the index (kept): %s",
            index,
            len(extra),
            ", ".join(extra[:10]),
        )
