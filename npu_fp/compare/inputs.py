"""What `npu-fp compare` compares: models (fingerprinted once, cached by identity) and signatures.

Every rank resolves the same list, so the fingerprinting of uncached models is one collective call
per model. Cached signatures are keyed by the files' content stamps (size, mtime, sampled bytes:
io/stamp.py), so replaced weights are fingerprinted again. A signature keeps its model's path;
when that folder holds other files (other headers), only hashes and profiles are available for that
entry and its pairs say so; when it holds the same headers but other bytes than the signature's
stamps describe, the folder is fingerprinted again (`compare.refingerprint_stale`, default) or
the run stops with `StaleSignatureError` naming the file: statistics of one model are never mixed
with the weights of another.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npu_fp.config import RunConfig
from npu_fp.dist import DistContext, barrier, main_raises_everywhere
from npu_fp.io.safetensors_header import CheckpointError
from npu_fp.io.source import open_model
from npu_fp.io.stamp import StaleSignatureError, folder_stamps, stamp_mismatch
from npu_fp.signature import Signature, SignatureError, load_signature

log = logging.getLogger(__name__)


class CompareInputError(ValueError):
    """A model or signature given to `npu-fp compare` cannot be used; the message says which."""


# Fingerprints the model folder (collective over all ranks) into `folder`, where rank 0 writes
# `signature.json`: (ctx, cfg, model folder, output folder, display name). The command layer
# supplies it, so compare/ never imports the fingerprint job above it.
FingerprintFn = Callable[[DistContext, RunConfig, str, Path, str], object]


@dataclass(frozen=True)
class Entry:
    name: str
    signature_path: str
    weights: str | None  # model folder the weight-level tests stream from
    weights_note: str  # why weights are (not) available


def cache_key(path: str) -> tuple[str, str]:
    """(resolved root, key) where key changes whenever the model's files change."""
    src = open_model(path)
    stamps = folder_stamps(src.root, [f.name for f in src.files])
    h = hashlib.sha256()
    h.update(src.root.encode())
    h.update(src.config_sha256.encode())
    for f in src.files:
        st = stamps[f.name]
        h.update(
            f"{f.name}\0{f.header_sha256}\0{st.size}\0{st.mtime_ns}\0{st.sample_sha256}\n".encode()
        )
    return src.root, h.hexdigest()


def weights_of(sig: Signature) -> tuple[str | None, str]:
    """The model folder behind a signature, if it still holds the fingerprinted files (same
    headers); whether it holds the same bytes is `stale_reason`'s question."""
    path = sig.identity.get("path")
    if not path or not Path(path).exists():  # a model folder, or a .gguf file
        return None, f"model folder {path!r} of this signature is not available: signature only"
    try:
        src = open_model(path)
    except (CheckpointError, OSError) as e:
        return None, f"model folder {path} unreadable ({e}): signature only"
    now = sorted((f.name, f.size, f.header_sha256) for f in src.files)
    then = sorted((f["name"], f["size"], f["header_sha256"]) for f in sig.identity.get("files", []))
    if now != then:
        return None, f"model folder {path} changed since it was fingerprinted: signature only"
    return src.root, f"weights streamed from {path}"


def _display_names(cfg: RunConfig, defaults: list[str], names: list[str] | None) -> list[str]:
    given = list(names if names is not None else cfg.compare.names)
    if given and len(given) != len(defaults):
        raise CompareInputError(
            f"compare.names has {len(given)} names for {len(defaults)} inputs (models first, "
            "then signatures); give one name per input or none"
        )
    out, seen = [], {}
    for n in given or defaults:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}-{k + 1}")
    return out


def resolve_entries(
    ctx: DistContext,
    cfg: RunConfig,
    models: list[str],
    signatures: list[str],
    out_dir: Path,
    fingerprint: FingerprintFn | None,
    names: list[str] | None = None,
) -> list[Entry]:
    """Fingerprint what is not cached (collective), load every signature; same list on all ranks.

    `fingerprint` is only called for models without a cached signature; without one, models are
    refused (signatures only)."""
    if len(models) + len(signatures) < 2:
        raise CompareInputError(
            f"compare needs at least two inputs, got {len(models)} model(s) and {len(signatures)} "
            "signature(s): npu-fp compare compare.models=[DIR1,DIR2] (or "
            "compare.signatures=[A.json,B.json])"
        )
    if models and fingerprint is None:
        raise CompareInputError("this caller compares signatures only; models were given")
    cache = (
        Path(cfg.compare.cache_dir).expanduser()
        if cfg.compare.cache_dir
        else out_dir / "signatures"
    )
    error: BaseException | None = None
    keys: list[tuple[str, str]] = []
    try:
        for m in models:
            if not Path(m).expanduser().exists():
                raise CompareInputError(f"compare.models: {m} does not exist")
            keys.append(cache_key(str(Path(m).expanduser())))
    except (CheckpointError, OSError, CompareInputError) as e:
        error = e if isinstance(e, ValueError) else CompareInputError(f"compare.models: {e}")
    main_raises_everywhere(ctx, error)
    defaults = [Path(root).name for root, _ in keys]
    sig_docs: list[Signature] = []
    bad = []
    for s in signatures:
        try:
            sig_docs.append(load_signature(Path(s).expanduser()))
        except SignatureError as e:
            bad.append(str(e))
    if bad:
        raise CompareInputError("unusable signature(s):\n  " + "\n  ".join(bad))
    defaults += [sig.name for sig in sig_docs]
    display = _display_names(cfg, defaults, names)
    entries: list[Entry] = []
    for (root, key), name in zip(keys, display, strict=False):
        sig_path = cached_signature(ctx, cfg, root, key, cache, fingerprint)
        entries.append(Entry(name, str(sig_path), root, f"weights streamed from {root}"))
    for sig, name in zip(sig_docs, display[len(keys) :], strict=True):
        weights, note = weights_of(sig)
        stale = stale_reason(sig, weights) if weights else None
        if stale is None:
            entries.append(Entry(name, str(sig.path), weights, note))
            continue
        if not cfg.compare.refingerprint_stale:
            raise StaleSignatureError(
                f"{sig.path}: its model folder holds other weights than it describes: {stale}; "
                "fingerprint the folder again (or drop compare.refingerprint_stale=false)"
            )
        log.warning("%s is stale (%s): fingerprinting %s again", sig.path, stale, weights)
        root, key = cache_key(weights)
        fresh = cached_signature(ctx, cfg, root, key, cache, fingerprint)
        entries.append(
            Entry(name, str(fresh), root, f"signature stale ({stale}); fingerprinted again")
        )
    return entries


def stale_reason(sig: Signature, root: str) -> str | None:
    """Why the weights in `root` are not the bytes `sig` was computed from, or None."""
    return stamp_mismatch(sig.identity.get("files", []), root)


def cached_signature(
    ctx: DistContext,
    cfg: RunConfig,
    root: str,
    key: str,
    cache: Path,
    fingerprint: FingerprintFn | None,
) -> Path:
    """The signature of `root` under the cache, fingerprinted first unless cached (collective)."""
    folder = cache / f"{Path(root).name}-{key[:16]}"
    sig_path = folder / "signature.json"
    reuse = False
    if sig_path.is_file():
        try:
            load_signature(sig_path)
            reuse = True
        except SignatureError as e:
            log.warning("cached signature unusable, fingerprinting again: %s", e)
    barrier(ctx)  # every rank has decided before anyone writes the cache
    if not reuse:
        if fingerprint is None:
            raise CompareInputError(
                f"{root}: no cached signature, and this caller compares signatures only"
            )
        fingerprint(ctx, cfg, root, folder, Path(root).name)
        barrier(ctx)
    else:
        log.info("%s: reusing cached signature %s", root, sig_path)
    return sig_path
