"""The gate every user file passes before it is parsed: kind, containment, size, JSON shape.

A "model" may come from anyone, so reading it must never hang, exhaust memory or end in a
traceback. The rules, each raising `InputError` (a ValueError) that names the file:
- only regular files are opened: a FIFO, device or directory in a file's place is refused before
  any blocking `open` (stat first, then open with O_NONBLOCK and fstat the descriptor we got);
- a file named by a model folder must resolve inside that folder, or inside its Hugging Face
  cache repository (`models--org--name`, whose snapshots link into `blobs/`);
- JSON is read up to a size cap, with NaN / Infinity / overflowing numbers and nesting deeper
  than `MAX_JSON_DEPTH` refused (never a RecursionError);
- counts a config claims are checked against what the checkpoint holds before anyone loops
  over them.
The checks are hand-written because no library covers them: `json` has neither a depth limit nor
a size cap, and the safetensors package validates only its own header format.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64  # serde_json (the safetensors reference) stops at 128; real files need < 10
CONFIG_MAX_BYTES = 16 << 20
INDEX_MAX_BYTES = 256 << 20  # a 100k-tensor index is ~10 MB
TOKENIZER_MAX_BYTES = 512 << 20
SIGNATURE_MAX_BYTES = 1 << 30
SMALL_MAX_BYTES = 1 << 20  # refs/main and similar one-line files

# Largest magnitude a number read from JSON may have: squares and products of two such values
# stay finite in float64, so statistics built from them cannot overflow into inf.
MAX_JSON_NUMBER = 1e150


class InputError(ValueError):
    """A file given to npu_fp is unusable. The message names the file, the tensor where there is
    one, and what was expected; the CLI prints it as `npu-fp: error: ...` and exits 2."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def os_error(path: str | os.PathLike[str], action: str, e: OSError) -> InputError:
    """An OSError as a named error (permission, missing, I/O error, full disk...)."""
    why = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "no such file",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EIO: "I/O error",
        errno.ELOOP: "too many levels of symbolic links",
    }
    return InputError(f"{path}: cannot {action}: {why.get(e.errno, e.strerror or str(e))}")


def is_regular(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (through symlinks); never opens anything."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def exists(path: str | os.PathLike[str]) -> bool:
    """Something (of any kind) is there; a dangling symlink counts, so it is reported, not skipped."""
    return os.path.lexists(path)


def check_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """The size of `path`, a regular file; InputError for anything else."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise os_error(path, f"read {what}", e) from e
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: {what} is {_kind(st.st_mode)}; expected a regular file")
    return st.st_size


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """A read-only descriptor of the regular file `path`; never blocks on a FIFO or device."""
    check_regular(path, what)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise os_error(path, f"open {what}", e) from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise os_error(path, f"stat {what}", e) from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path}: {what} is {_kind(mode)}; expected a regular file")
    return fd


def pread_exact(fd: int, n: int, offset: int, path: str | os.PathLike[str], what: str) -> bytes:
    """`n` bytes at `offset`, or InputError when the file ends first."""
    chunks, done = [], 0
    while done < n:
        try:
            b = os.pread(fd, min(n - done, 64 << 20), offset + done)
        except OSError as e:
            raise os_error(path, f"read {what}", e) from e
        if not b:
            raise InputError(
                f"{path}: {what} ended at byte {offset + done}, {n - done} bytes short "
                "(truncated, or changed while reading)"
            )
        chunks.append(b)
        done += len(b)
    return b"".join(chunks)


def read_regular(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
    """The whole content of a regular file no larger than `max_bytes`."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise InputError(
                f"{path}: {what} is {size} bytes; at most {max_bytes} expected for this kind of file"
            )
        return pread_exact(fd, size, 0, path, what)
    finally:
        os.close(fd)


# --- JSON -------------------------------------------------------------------------------------


class _Reject(ValueError):
    pass


def _no_constants(name: str) -> float:
    raise _Reject(f"{name} is not valid JSON (NaN / Infinity are refused)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x) or abs(x) > MAX_JSON_NUMBER:
        raise _Reject(f"number {text[:40]} is out of range (|x| <= {MAX_JSON_NUMBER:g} expected)")
    return x


def _object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # C speed; the per-key loop runs only when a key repeats
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Reject(f"duplicate key {k[:200]!r}")
            seen.add(k)
    return out


def json_depth_ok(doc: Any, max_depth: int) -> bool:
    """No container nests deeper than `max_depth` (iterative: deep input cannot overflow a stack)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def loads_json(raw: bytes | str, where: str, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, no duplicate keys, bounded floats and nesting.

    `max_depth=None` skips the depth walk (the interpreter's recursion limit still applies, as a
    named error) for callers that check the full structure themselves. Integers are bounded by
    their consumers (counts, ids, offsets each have their own range).
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        doc = json.loads(
            text,
            parse_constant=_no_constants,
            parse_float=_finite_float,
            object_pairs_hook=_object_no_duplicates,
        )
    except RecursionError as e:
        raise InputError(f"{where}: JSON nests deeper than {max_depth} levels") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (invalid byte at position {e.start})") from e
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except _Reject as e:
        raise InputError(f"{where}: invalid JSON: {e}") from e
    except ValueError as e:  # an integer past the interpreter's digit limit
        raise InputError(f"{where}: invalid JSON: number out of range ({str(e)[:80]})") from e
    if max_depth is not None and not json_depth_ok(doc, max_depth):
        raise InputError(f"{where}: JSON nests deeper than {max_depth} levels")
    return doc


def load_json(
    path: str | os.PathLike[str],
    max_bytes: int,
    what: str = "JSON file",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    return loads_json(read_regular(path, max_bytes, what), str(path), max_depth)


def load_json_object(path: str | os.PathLike[str], max_bytes: int, what: str = "JSON file") -> dict:
    doc = load_json(path, max_bytes, what)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: {what} must hold a JSON object, got {type(doc).__name__}")
    return doc


# --- containment ------------------------------------------------------------------------------


def model_roots(root: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Where files of the model folder `root` may live: the folder itself and, for a Hugging Face
    cache snapshot (`models--org--name/snapshots/<rev>`), the cache repository holding `blobs/`."""
    root = Path(root).absolute()
    roots = [Path(os.path.realpath(root))]
    if root.parent.name == "snapshots":
        roots.append(Path(os.path.realpath(root.parent.parent)))
    return tuple(roots)


def contained(path: str | os.PathLike[str], roots: tuple[Path, ...], where: str) -> Path:
    """`path` with every symlink resolved; InputError when it leaves all of `roots`.

    realpath resolves symlinked sub-folders too, so `sub/x.safetensors` with `sub -> /etc`
    is caught even though the name itself has no `..`.
    """
    real = Path(os.path.realpath(path))
    for r in roots:
        if real == r or r in real.parents:
            return real
    raise InputError(
        f"{where}: {path} resolves to {real}, outside the model folder {roots[0]}; "
        "files of a model must live inside its folder (or its Hugging Face cache repository)"
    )


# --- config.json ------------------------------------------------------------------------------

# Counts of things the checkpoint must store at least one tensor for: bounded by the tensor count.
# Only keys npu_fp reads: others (moe_layer_freq, ...) may legitimately be lists in some families.
COUNT_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_shared_experts",
    "num_shared_experts",
    "num_nextn_predict_layers",
    "num_mtp_layers",
    "num_groups",
    "num_expert_groups",
    "n_group",
    "experts_per_group",
    "num_experts_per_tok",
)
# Sizes of some tensor dimension: bounded by the largest dimension stored.
SIZE_KEYS = (
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "multi_query_group_num",
    "head_dim",
    "intermediate_size",
    "n_inner",
    "ffn_hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def check_config(config: Mapping[str, Any], where: str, shapes: Iterable[tuple[int, ...]]) -> None:
    """Types and bounds of the config.json fields npu_fp reads, against the stored tensors.

    Nothing downstream may allocate from a count this file claims, so every count is bounded
    by the checkpoint: a layer or expert count by the number of tensors, a size by the largest
    stored dimension.
    """
    shapes = list(shapes)
    n_tensors = len(shapes)
    max_dim = max((d for s in shapes for d in s), default=0)
    sections = [("", config)]
    text = config.get("text_config")
    if text is not None:
        if not isinstance(text, Mapping):
            raise InputError(f"{where}: text_config must be an object, got {type(text).__name__}")
        sections.append(("text_config.", text))
    for prefix, cfg in sections:
        archs = cfg.get("architectures")
        if archs is not None and (
            not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
        ):
            raise InputError(
                f"{where}: {prefix}architectures must be a list of strings such as "
                f'["LlamaForCausalLM"], got {_short(archs)}'
            )
        mt = cfg.get("model_type")
        if mt is not None and not isinstance(mt, str):
            raise InputError(f"{where}: {prefix}model_type must be a string, got {_short(mt)}")
        for keys, bound, what in (
            (COUNT_KEYS, n_tensors, f"the {n_tensors} tensors stored"),
            (SIZE_KEYS, max_dim, f"the largest stored dimension ({max_dim})"),
        ):
            for key in keys:
                v = cfg.get(key)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int):
                    raise InputError(f"{where}: {prefix}{key} must be an integer, got {_short(v)}")
                if not 0 <= v <= bound:
                    raise InputError(
                        f"{where}: {prefix}{key}={v} is out of range: 0 to {bound}, "
                        f"{what}; the config does not describe this checkpoint"
                    )


def _short(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, str | int | float | bool | None) else type(v).__name__
    return s if len(s) <= 80 else s[:77] + "..."


# --- tokenizer vocabulary ---------------------------------------------------------------------

MAX_TOKEN_ID = 1 << 31  # token ids index embedding rows; no vocabulary is larger


def _token_id(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_TOKEN_ID else None


def parse_vocab(
    doc: Any, where: str, fmt: str = "tokenizer.json"
) -> tuple[dict[str, int] | None, str]:
    """Token string -> id from a parsed tokenizer.json (any model type) or, with
    fmt="vocab.json", a plain {token: id} object.

    (None, why) when the vocabulary is unusable: wrong shapes, ids that are negative or out of
    range, or ids shared by so many tokens that aligning through them would test nothing.
    """
    if not isinstance(doc, dict):
        return None, f"{where}: must be a JSON object, got {type(doc).__name__}"
    vocab: dict[str, int] = {}
    if fmt == "tokenizer.json":
        model = doc.get("model") or {}
        if not isinstance(model, dict):
            return None, f"{where}: 'model' must be an object, got {type(model).__name__}"
        raw = model.get("vocab")
        if isinstance(raw, dict):
            items: Iterable[tuple[Any, Any]] = raw.items()
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
            if not all(isinstance(p, list) and p and isinstance(p[0], str) for p in raw):
                return None, f"{where}: Unigram vocab entries must be [piece, score] pairs"
            items = ((p[0], i) for i, p in enumerate(raw))
        elif raw is None:
            items = ()
        else:
            return (
                None,
                f"{where}: model.vocab must be an object or a list, got {type(raw).__name__}",
            )
        added = doc.get("added_tokens") or []
        if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
            return None, f"{where}: added_tokens must be a list of objects"
        items = [*items, *((a.get("content"), a.get("id")) for a in added)]
    else:  # vocab.json: {token: id}
        items = doc.items()
    for tok, tid in items:
        i = _token_id(tid)
        if not isinstance(tok, str) or i is None:
            return None, (
                f"{where}: token {_short(tok)} has id {_short(tid)}; ids must be "
                f"integers in [0, {MAX_TOKEN_ID})"
            )
        vocab[tok] = i
    if not vocab:
        return None, f"{where}: no vocabulary inside"
    distinct = len(set(vocab.values()))
    if 2 * distinct < len(vocab):
        return None, (
            f"{where}: {len(vocab)} tokens share only {distinct} ids; a vocabulary "
            "that maps many tokens to one id cannot align embeddings"
        )
    return vocab, f"{Path(where).name}: {len(vocab)} tokens"
