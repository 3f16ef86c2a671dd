"""Model folders: single-file, sharded (with index) or Hugging Face cache, read offline.

`open_model(path)` reads config.json and every shard's header, never tensor data, and returns a
`ModelSource`: the tensors by name with their byte ranges, and the files with their sizes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from npu_fp.io.safetensors_header import (
    MAX_TENSORS,
    CheckpointError,
    FileHeader,
    TensorRef,
    read_header,
)
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


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str  # path relative to the model folder
    size: int
    header_sha256: str  # digest of the header JSON: changes whenever names, shapes or layout change


@dataclass(frozen=True, slots=True)
class ModelSource:
    root: str  # the resolved snapshot / model folder
    config: dict
    config_sha256: str
    tensors: dict[str, TensorRef]  # sorted by name
    files: tuple[FileInfo, ...]
    metadata: dict[str, str]  # __metadata__ of the first file

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
        raise CheckpointError(f"{p}: expected a model folder or a .safetensors file")
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
    root = resolve_model_dir(path)
    config, config_sha = _read_config(root)
    shard_names = _shard_names(root)
    headers: dict[str, FileHeader] = {}
    count = 0
    for name in shard_names:
        headers[name] = h = read_header(member(root, name, str(root)))
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
    index = root / INDEX_NAME
    if exists(index):
        _check_index_agrees(root, index, tensors)
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


def _read_config(root: Path) -> tuple[dict, str]:
    cfg_path = root / "config.json"
    if not exists(cfg_path):
        raise CheckpointError(
            f"{cfg_path}: missing; config.json tells the architecture and is required"
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


def _safe_member(root: Path, name: object, what: str) -> str:
    """A file name from an index must name a file inside the model folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{root / INDEX_NAME}: {what}: shard name must be a non-empty string")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{root / INDEX_NAME}: {what} names {name[:200]!r}, a path outside the model folder"
        )
    return p.as_posix()


def _weight_map(root: Path, index: Path) -> dict[str, str]:
    try:
        data = load_json_object(member(root, INDEX_NAME, str(root)), INDEX_MAX_BYTES, "index")
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


def _shard_names(root: Path) -> list[str]:
    index = root / INDEX_NAME
    if exists(index):
        weight_map = _weight_map(root, index)
        names = sorted(
            {_safe_member(root, v, f"tensor {k[:200]!r}") for k, v in weight_map.items()}
        )
        for n in names:
            if not exists(root / n):
                raise CheckpointError(f"{index}: names shard {n!r}, which is missing from {root}")
        return names
    single = root / "model.safetensors"
    if exists(single):
        return ["model.safetensors"]
    names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise CheckpointError(
            f"{root}: no model.safetensors, no {INDEX_NAME} and no *.safetensors files"
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
