"""Text for the activation step: the embedded corpus, text / JSONL files or folders, and batching.

The default corpus is the text of the standard library's bundled documentation topics
(`pydoc_data.topics`), which every CPython installation carries, so the default needs no download.
Documents are tokenized one by one (no special tokens added) and concatenated into one token stream;
only the first `CORPUS_TOKEN_FACTOR` x (tokens needed) tokens are tokenized. The stream is cut into
non-overlapping windows of `seq_len` tokens and the batches are a seeded permutation of those windows,
so a (corpus, tokenizer, seed, shape) tuple always gives the same token ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import BinaryIO

import torch
from tokenizers import Tokenizer

from npu_fp.forward.errors import CorpusError, TokenizerError, TokenizerMissingError
from npu_fp.io.validate import (
    TOKENIZER_MAX_BYTES,
    InputError,
    check_regular,
    contained,
    exists,
    model_roots,
    open_regular,
    read_regular,
)

log = logging.getLogger(__name__)

EMBEDDED = "embedded:pydoc_data.topics"
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst"})
JSONL_SUFFIXES = frozenset({".jsonl"})
CORPUS_TOKEN_FACTOR = 2  # tokenize up to this many times the tokens the batches need
TEXT_CHUNK_BYTES = 1 << 20  # text files are tokenized in chunks cut at line ends


@dataclass(frozen=True, slots=True)
class TokenBatches:
    ids: torch.Tensor  # int64 [num_batches, batch_size, seq_len]
    description: str  # the corpus: EMBEDDED or the resolved path
    corpus_sha256: str  # of the text consumed (UTF-8, documents separated by NUL)
    tokens_sha256: str  # of the batches' token ids (int64 little-endian): what the model saw
    tokenizer_sha256: str
    corpus_tokens: int  # tokens in the stream the windows were cut from
    repeated_windows: bool  # the corpus was too short and windows appear more than once

    @property
    def num_batches(self) -> int:
        return int(self.ids.shape[0])


def load_tokenizer(model_root: str | Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json`, through the `tokenizers` library."""
    path = Path(model_root) / "tokenizer.json"
    if not exists(path):
        raise TokenizerMissingError(
            f"{path}: missing; the activation step tokenizes its corpus with the checkpoint's own "
            "tokenizer.json (Hugging Face `tokenizers` format). Copy it into the model folder or "
            "set activations.enabled=false"
        )
    try:  # a FIFO would block the Rust reader; a symlink must not lead out of the folder
        check_regular(contained(path, model_roots(model_root), str(model_root)), "tokenizer.json")
    except InputError as e:
        raise TokenizerError(str(e)) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path}: not a valid `tokenizers` tokenizer.json: {e}") from e


def iter_documents(corpus: str | None) -> tuple[str, Iterator[str]]:
    """(description, documents) for the embedded corpus (None) or a file / folder path."""
    if corpus is None or corpus == EMBEDDED:
        return EMBEDDED, _embedded_documents()
    p = Path(corpus).expanduser()
    if not p.exists():
        raise CorpusError(
            f"{p}: activations.corpus does not exist (expected a text / .jsonl file "
            "or a folder of them)"
        )
    if p.is_file():
        return str(p.resolve()), _file_documents(p)
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
    )
    if not files:
        raise CorpusError(
            f"{p}: folder holds no corpus files; expected *{', *'.join(sorted(TEXT_SUFFIXES))} "
            f"or *.jsonl files"
        )
    return str(p.resolve()), (doc for f in files for doc in _file_documents(f))


def _embedded_documents() -> Iterator[str]:
    for key in sorted(topics):
        yield topics[key]


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _jsonl_documents(path)
    else:
        yield from _text_chunks(path)


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not UTF-8 text (invalid byte {raw[e.start]:#04x} at byte offset "
            f"{offset + e.start}); convert it to UTF-8 or leave it out of activations.corpus"
        ) from e


def _open_corpus(path: Path) -> BinaryIO:
    try:
        return os.fdopen(open_regular(path, "corpus file"), "rb")
    except InputError as e:
        raise CorpusError(str(e)) from None


def _text_chunks(path: Path) -> Iterator[str]:
    """The file in ~1 MiB pieces cut after a newline (a newline byte never splits a UTF-8 char)."""
    offset = 0
    pending = b""
    with _open_corpus(path) as f:
        while True:
            block = f.read(TEXT_CHUNK_BYTES)
            data = pending + block
            if not block:
                if data:
                    yield _decode(data, path, offset)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                continue
            yield _decode(data[:cut], path, offset)
            offset += cut
            pending = data[cut:]


def _jsonl_documents(path: Path) -> Iterator[str]:
    offset = 0
    with _open_corpus(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:  # plain json: corpora carry NaN and big numbers in fields we never read
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); expected one object "
                    'with a "text" string per line'
                ) from e
            except RecursionError as e:
                raise CorpusError(f"{path}:{lineno}: JSON nested too deeply") from e
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                yield obj["text"]
            elif isinstance(obj, str):
                yield obj
            else:
                raise CorpusError(
                    f'{path}:{lineno}: expected an object with a "text" string '
                    f"(or a JSON string), got {type(obj).__name__}"
                )


def tokenize_corpus(
    tokenizer: Tokenizer, corpus: str | None, max_tokens: int
) -> tuple[torch.Tensor, str, str]:
    """(int64 token stream of at most `max_tokens`, description, sha256 of the text consumed)."""
    description, docs = iter_documents(corpus)
    digest = hashlib.sha256()
    parts: list[torch.Tensor] = []
    total = 0
    chars = 0

    for doc in docs:
        if not doc.strip():
            continue
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
        chars += len(doc)
        # one document at a time: encode_batch's thread pool would compete with torch's threads
        ids = tokenizer.encode(doc, add_special_tokens=False).ids[: max_tokens - total]
        parts.append(torch.tensor(ids, dtype=torch.int64))
        total += len(ids)
        if total >= max_tokens:
            break
    if chars == 0 or total == 0:
        what = "holds no text" if chars == 0 else "tokenizes to zero tokens"
        raise CorpusError(
            f"{description}: the corpus {what}; activations need at least one sequence of text"
        )
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return stream, description, digest.hexdigest()


def make_batches(
    model_root: str | Path,
    corpus: str | None,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    seed: int,
    vocab_size: int | None,
) -> TokenBatches:
    """Tokenize the corpus with the checkpoint's tokenizer and cut it into seeded batches."""
    tokenizer = load_tokenizer(model_root)
    tok_bytes = read_regular(
        Path(model_root) / "tokenizer.json", TOKENIZER_MAX_BYTES, "tokenizer.json"
    )
    tok_sha = hashlib.sha256(tok_bytes).hexdigest()
    need = num_batches * batch_size
    stream, description, corpus_sha = tokenize_corpus(
        tokenizer, corpus, CORPUS_TOKEN_FACTOR * need * seq_len
    )
    windows = stream.numel() // seq_len
    if windows == 0:
        raise CorpusError(
            f"{description}: the corpus yields {stream.numel()} tokens, fewer than one sequence of "
            f"activations.seq_len={seq_len}; give a longer corpus or a shorter seq_len"
        )
    if vocab_size is not None:
        top = int(stream.max())
        if top >= vocab_size:
            raise TokenizerError(
                f"{Path(model_root) / 'tokenizer.json'}: produces token id {top}, but config.json "
                f"has vocab_size={vocab_size}; the tokenizer does not belong to this model"
            )
    gen = torch.Generator().manual_seed(seed)
    order = [torch.randperm(windows, generator=gen) for _ in range(-(-need // windows))]
    picked = torch.cat(order)[:need]
    repeated = windows < need
    if repeated:
        log.warning(
            "%s: %d windows of %d tokens for %d sequences; windows are reused",
            description,
            windows,
            seq_len,
            need,
        )
    starts = picked * seq_len
    ids = stream[starts[:, None] + torch.arange(seq_len)[None, :]]
    ids = ids.view(num_batches, batch_size, seq_len).contiguous()
    tokens_sha = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()
    return TokenBatches(
        ids, description, corpus_sha, tokens_sha, tok_sha, int(stream.numel()), repeated
    )
