"""The signature: a versioned, self-describing JSON file per model, checked on load.

Layout (schema 1):
  format, schema_version, created_by,
  identity   name, path, architecture, model_type, adapter, config_sha256, num_layers, num_experts,
             experts_per_group, num_tensors, total_bytes, files [name, size, header_sha256],
             content_hash (xxh3-128 over the sorted (name, tensor hash) pairs)
  settings   what shaped the numbers: segment_bytes, chunk_elems, device type
  tensors    one row per tensor and per fused part (see stats.aggregate.tensor_row)
  layers     the per-layer role table
  skipped / unmapped / warnings
  activations (optional, from the activations step)
  sha256     digest of the canonical JSON of everything else: any edit or truncation is detected
No pickle anywhere; the file is plain JSON that pandas, jq or a browser can read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

import npu_fp
from npu_fp.arch.base import RoleMap
from npu_fp.io.atomic import write_text_atomic
from npu_fp.io.source import ModelSource
from npu_fp.io.validate import (
    MAX_JSON_NUMBER,
    SIGNATURE_MAX_BYTES,
    InputError,
    exists,
    loads_json,
    read_regular,
)
from npu_fp.stats.aggregate import TensorStats, layer_table, tensor_row

FORMAT = "npu_fp.signature"
SCHEMA_VERSION = 1
CSV_COLUMNS = (
    "name",
    "layer",
    "role",
    "expert",
    "group",
    "part",
    "dtype",
    "numel",
    "mean",
    "std",
    "rms",
    "absmax",
    "max",
    "min",
    "l2",
    "kurtosis",
    "skew",
    "nan",
    "inf",
    "kind",
    "hash",
)


STD_DDOF = 1  # sample std (ddof 1), as numpy's std(ddof=1) and torch.std


def build_signature(
    source: ModelSource,
    rolemap: RoleMap,
    stats: list[TensorStats],
    skipped: list[str],
    name: str,
    settings: dict[str, Any],
    files: list[dict[str, Any]],
    activations: dict | None = None,
) -> Signature:
    """The sealed signature of a fingerprinted model (rank 0): identity, settings, rows, table."""
    rows = [tensor_row(ts) for ts in sorted(stats, key=lambda t: (t.ref.name, t.part or ""))]
    content = xxhash.xxh3_128()
    for r in rows:
        if not r["part"]:
            content.update(f"{r['name']}\0{r['hash']}\n".encode())
    identity = {
        "name": name,
        "path": source.root,
        "architecture": source.architecture,
        "model_type": source.config.get("model_type"),
        "adapter": rolemap.arch,
        "config_sha256": source.config_sha256,
        "num_layers": rolemap.num_layers,
        "num_experts": rolemap.num_experts,
        "experts_per_group": rolemap.experts_per_group,
        "num_tensors": len(source.tensors),
        "total_bytes": source.total_bytes,
        "files": files,  # name, size, header_sha256 and the content stamp (io/stamp.py)
        "content_hash": content.hexdigest(),
    }
    doc = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_by": f"npu_fp {npu_fp.__version__}",
        "identity": identity,
        "settings": {
            **settings,
            "std_ddof": STD_DDOF,
            "kurtosis": "excess (0 for a Gaussian)",
        },
        "tensors": rows,
        "layers": layer_table(stats),
        "skipped": skipped,
        "unmapped": list(rolemap.unmapped),
        "warnings": list(rolemap.warnings),
    }
    if activations is not None:
        doc["activations"] = activations
    return Signature(seal(doc))


class SignatureError(InputError):
    """A signature file is corrupted, of another schema, or not a signature."""


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(doc: dict) -> dict:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def dumps(doc: dict) -> str:
    return json.dumps(seal(doc), indent=1, allow_nan=False) + "\n"


@dataclass(frozen=True)
class Signature:
    doc: dict
    path: str | None = None

    @property
    def identity(self) -> dict:
        return self.doc["identity"]

    @property
    def name(self) -> str:
        return str(self.identity["name"])

    @property
    def tensors(self) -> list[dict]:
        return self.doc["tensors"]

    @property
    def layers(self) -> list[dict]:
        return self.doc["layers"]

    @property
    def num_layers(self) -> int:
        return int(self.identity["num_layers"])

    def profile(self, role: str, stat: str = "std", group: int | None = None) -> list[float | None]:
        """Per-layer values of `stat` for `role` (None where the layer lacks the role)."""
        out: list[float | None] = [None] * self.num_layers
        for row in self.layers:
            if row["role"] == role and row["group"] == group and 0 <= row["layer"] < len(out):
                out[row["layer"]] = row.get(stat)
        return out


def load_signature(path: str | Path) -> Signature:
    p = Path(path)
    if p.is_dir():
        p = p / "signature.json"
    if not exists(p):
        raise SignatureError(f"{p}: no signature file here")
    try:
        doc = loads_json(read_regular(p, SIGNATURE_MAX_BYTES, "signature"), str(p))
    except InputError as e:
        raise SignatureError(f"corrupted or unreadable signature: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SignatureError(f"{p}: not an npu_fp signature (format field missing or different)")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SignatureError(
            f"{p}: signature schema {version if isinstance(version, int) else str(version)[:20]!r}"
            f", but this npu_fp reads schema "
            f"{SCHEMA_VERSION}; re-run `npu-fp fingerprint` on the model to regenerate it"
        )
    digest = doc.get("sha256")
    body = {k: v for k, v in doc.items() if k != "sha256"}
    if digest != hashlib.sha256(_canonical(body)).hexdigest():
        raise SignatureError(
            f"{p}: corrupted signature: content does not match its sha256 (edited or truncated)"
        )
    # the digest proves integrity, not authorship: anyone can reseal an edited file, so the
    # fields compare relies on are checked as carefully as any other input
    check_schema(doc, str(p))
    return Signature(doc, str(p))


ROW_INDICES = frozenset({"layer", "expert", "group"})
ROW_NUMBERS = frozenset(
    {
        "numel",
        "mean",
        "std",
        "rms",
        "absmax",
        "max",
        "min",
        "l2",
        "kurtosis",
        "skew",
        "nan",
        "inf",
        "norm_offset",
    }
)
ROW_STRINGS = frozenset({"name", "role", "part", "kind", "dtype", "hash"})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    """A number whose square and products stay finite (statistics are built from these)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= MAX_JSON_NUMBER


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise SignatureError(f"{where}: invalid signature: {what}")


def check_schema(doc: dict, where: str) -> None:
    """Types and bounds of every field a comparison reads (schema 1)."""
    ident = doc.get("identity")
    _need(isinstance(ident, dict), where, "'identity' must be an object")
    tensors, layers = doc.get("tensors"), doc.get("layers")
    _need(
        isinstance(tensors, list) and all(isinstance(r, dict) for r in tensors),
        where,
        "'tensors' must be a list of objects",
    )
    _need(
        isinstance(layers, list) and all(isinstance(r, dict) for r in layers),
        where,
        "'layers' must be a list of objects",
    )
    _need(isinstance(ident.get("name"), str), where, "identity.name must be a string")
    _need(
        ident.get("path") is None or isinstance(ident["path"], str),
        where,
        "identity.path must be a string",
    )
    # every layer and every expert has at least one tensor row: counts beyond that are forged,
    # and profiles allocate one slot per layer
    for key in ("num_layers", "num_experts", "experts_per_group"):
        v = ident.get(key)
        _need(
            _is_int(v) and 0 <= v <= len(tensors),
            where,
            f"identity.{key} must be an integer from 0 to {len(tensors)} (the tensor rows), "
            f"got {str(v)[:40]}",
        )
    files = ident.get("files")
    _need(
        isinstance(files, list)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and _is_int(f.get("size"))
            and f["size"] >= 0
            and isinstance(f.get("header_sha256"), str)
            for f in files
        ),
        where,
        "identity.files must list {name, size, header_sha256}",
    )
    for f in files:  # the content stamp (io/stamp.py); absent in signatures of older npu_fp
        _need(
            all(k not in f for k in ("mtime_ns", "sample_sha256"))
            or (_is_int(f.get("mtime_ns")) and isinstance(f.get("sample_sha256"), str)),
            where,
            "identity.files: mtime_ns must be an integer and sample_sha256 a string",
        )
    for i, r in enumerate(tensors):
        _need(isinstance(r.get("name"), str), where, f"tensors[{i}].name must be a string")
        for k, v in r.items():
            if k in ROW_INDICES:
                _need(
                    v is None or (_is_int(v) and v >= 0),
                    where,
                    f"tensors[{i}].{k} must be a non-negative integer or null",
                )
            elif k in ROW_NUMBERS:
                _need(v is None or _is_num(v), where, f"tensors[{i}].{k} must be a number or null")
            elif k in ROW_STRINGS:
                _need(v is None or isinstance(v, str), where, f"tensors[{i}].{k} must be a string")
            elif k == "shape":
                _need(
                    isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v),
                    where,
                    f"tensors[{i}].shape must be a list of non-negative integers",
                )
    for i, r in enumerate(layers):
        _need(isinstance(r.get("role"), str), where, f"layers[{i}].role must be a string")
        _need(
            _is_int(r.get("layer")) and r["layer"] >= 0,
            where,
            f"layers[{i}].layer must be a non-negative integer",
        )
        _need(
            r.get("group") is None or (_is_int(r["group"]) and r["group"] >= 0),
            where,
            f"layers[{i}].group must be a non-negative integer or null",
        )
        for k, v in r.items():
            _need(
                k == "role" or v is None or _is_num(v),
                where,
                f"layers[{i}].{k} must be a number or null",
            )
    for key in ("settings", "activations"):
        _need(
            doc.get(key) is None or isinstance(doc[key], dict), where, f"'{key}' must be an object"
        )


def rows_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """A tidy CSV of `columns` (None becomes an empty cell, extra keys are left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def tensors_csv(rows: list[dict[str, Any]]) -> str:
    return rows_csv(rows, CSV_COLUMNS)


def write_signature(doc: dict, out_dir: Path) -> Path:
    return write_text_atomic(out_dir / "signature.json", dumps(doc))
