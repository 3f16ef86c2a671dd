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

from npu_fp.io.atomic import write_text_atomic

FORMAT = "npu_fp.signature"
SCHEMA_VERSION = 1
CSV_COLUMNS = (
    "name", "layer", "role", "expert", "group", "part", "dtype", "numel", "mean", "std", "rms",
    "absmax", "max", "min", "l2", "kurtosis", "skew", "nan", "inf", "kind", "hash",
)


class SignatureError(ValueError):
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
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SignatureError(f"{p}: no signature file here") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{p}: corrupted signature (not valid JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SignatureError(f"{p}: not an npu_fp signature (format field missing or different)")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SignatureError(
            f"{p}: signature schema {version!r}, but this npu_fp reads schema {SCHEMA_VERSION}; "
            "re-run `npu-fp fingerprint` on the model to regenerate it"
        )
    digest = doc.get("sha256")
    body = {k: v for k, v in doc.items() if k != "sha256"}
    if digest != hashlib.sha256(_canonical(body)).hexdigest():
        raise SignatureError(
            f"{p}: corrupted signature: content does not match its sha256 (edited or truncated)"
        )
    return Signature(doc, str(p))


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
