"""Model folders: single-file, sharded (with index) or Hugging Face cache, read offline.

`open_model(path)` reads config.json and every shard's header, never tensor data, and returns a
`ModelSource`: the tensors by name with their byte ranges, and the files with their sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from npu_fp.io.safetensors_header import CheckpointError, FileHeader, TensorRef, read_header

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
    if not p.exists():
        raise CheckpointError(f"{p}: model path does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return p.parent.resolve()
        raise CheckpointError(f"{p}: expected a model folder or a .safetensors file")
    snapshots = p / "snapshots"
    if snapshots.is_dir() and not any(p.glob("*.safetensors")):
        ref_main = p / "refs" / "main"
        if ref_main.is_file():
            rev = ref_main.read_text().strip()
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


def open_model(path: str | os.PathLike[str]) -> ModelSource:
    root = resolve_model_dir(path)
    config, config_sha = _read_config(root)
    shard_names = _shard_names(root)
    headers: dict[str, FileHeader] = {}
    for name in shard_names:
        headers[name] = read_header(root / name)
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
    if index.is_file():
        _check_index_agrees(root, index, tensors)
    if not tensors:
        raise CheckpointError(f"{root}: the checkpoint holds no tensors")
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
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path}: missing; config.json tells the architecture and is required"
        )
    raw = cfg_path.read_bytes()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object")
    return config, hashlib.sha256(raw).hexdigest()


def _safe_member(root: Path, name: object, what: str) -> str:
    """A file name from an index must name a file inside the model folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{root / INDEX_NAME}: {what}: shard name must be a non-empty string")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{root / INDEX_NAME}: {what} names {name!r}, a path outside the model folder"
        )
    return p.as_posix()


def _shard_names(root: Path) -> list[str]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index: {e}") from e
        names = sorted({_safe_member(root, v, f"tensor {k!r}") for k, v in weight_map.items()})
        for n in names:
            if not (root / n).is_file():
                raise CheckpointError(f"{index}: names shard {n!r}, which is missing from {root}")
        return names
    single = root / "model.safetensors"
    if single.is_file():
        return ["model.safetensors"]
    names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise CheckpointError(
            f"{root}: no model.safetensors, no {INDEX_NAME} and no *.safetensors files"
        )
    return names


def _check_index_agrees(root: Path, index: Path, tensors: dict[str, TensorRef]) -> None:
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in weight_map.items():
        ref = tensors.get(name)
        if ref is None:
            raise CheckpointError(f"{index}: tensor {name!r} is listed in {shard} but not stored there")
        if Path(ref.file).name != Path(shard).name:
            raise CheckpointError(
                f"{index}: tensor {name!r} is listed in {shard} but stored in {Path(ref.file).name}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        log.warning("%s: %d tensors are stored but not listed in the index (kept): %s",
                    index, len(extra), ", ".join(extra[:10]))
