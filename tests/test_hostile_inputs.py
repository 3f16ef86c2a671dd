"""Hostile-input catalogue: every case ends in the named error (or an unusable-with-reason
vocabulary), never a traceback, a hang or an allocation sized by a number the file claims.

Function-level cases run in-process under a hang guard; the CLI cases (exit 2, nothing left in
the run directory) are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import save_file

from npu_fp import zoo
from npu_fp.arch.base import TensorRole
from npu_fp.compare.tensors import read_vocab
from npu_fp.device import resolve_device
from npu_fp.io import rundir
from npu_fp.io.reader import FileCache, RowReader, row_blocks
from npu_fp.io.safetensors_header import CheckpointError, read_header
from npu_fp.io.source import open_model
from npu_fp.io.validate import InputError, load_json, parse_vocab, read_regular
from npu_fp.signature import SignatureError, dumps, load_signature
from npu_fp.stats.aggregate import TensorStats, tensor_row
from npu_fp.stats.kernel import MomentKernel

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 1}
HANG_GUARD_S = 30  # far above any case's real cost; only a hang reaches it


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """A case that loops or blocks fails instead of stalling the suite (SIGALRM, main thread).
    The CLI cases run in subprocesses bounded by their own timeout instead."""
    if request.node.get_closest_marker("slow"):
        yield
        return

    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(f"case still running after {HANG_GUARD_S}s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(HANG_GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def raw_st(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def model(
    tmp: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    config: object = CONFIG,
    name: str = "m",
) -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    cfg = config if isinstance(config, bytes | str) else json.dumps(config)
    (d / "config.json").write_text(cfg) if isinstance(cfg, str) else (
        d / "config.json"
    ).write_bytes(cfg)
    save_file(
        tensors
        or {
            "model.embed_tokens.weight": torch.randn(8, 4),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
        },
        str(d / "model.safetensors"),
    )
    return d


def fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


# --- safetensors headers: the reference implementation's rules ---------------------------------

ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADER_CASES: dict[str, tuple[dict | bytes, bytes, str]] = {
    "bool dim": ({"t": {**ENTRY, "shape": [True, 2]}}, b"\0" * 8, "unsigned integers"),
    "bool offset": (
        {"t": {**ENTRY, "shape": [1], "data_offsets": [False, 4]}},
        b"\0" * 4,
        "unsigned integers",
    ),
    "float offset": ({"t": {**ENTRY, "data_offsets": [0.0, 8]}}, b"\0" * 8, "unsigned integers"),
    "negative dim": ({"t": {**ENTRY, "shape": [-2]}}, b"\0" * 8, "unsigned integers"),
    "dim past int64": ({"t": {**ENTRY, "shape": [1 << 63, 0]}}, b"", "below 2**63"),
    "element count overflow": (
        {"t": {**ENTRY, "shape": [1 << 40, 1 << 40], "data_offsets": [0, 0]}},
        b"",
        "overflows",
    ),
    "non-string metadata": (
        {"__metadata__": {"format": 5}, "t": ENTRY},
        b"\0" * 8,
        "strings to strings",
    ),
    "metadata list": ({"__metadata__": ["pt"], "t": ENTRY}, b"\0" * 8, "strings to strings"),
    "header not an object start": (b' {"t": 1}', b"", "does not start"),
    "NaN in header": (
        b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}',
        b"",
        "NaN",
    ),
    "nested 100k deep": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nests deeper"),
    "duplicate tensor": (
        b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"t": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
        b"\0\0",
        "duplicate tensor name",
    ),
    "sub-byte misaligned": (
        {"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
        b"\0\0",
        "not whole bytes",
    ),
    "hole before zero-byte": (
        {
            "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "z": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]},
        },
        b"\0\0",
        "hole",
    ),
    "dtype not a string": ({"t": {**ENTRY, "dtype": ["F32"]}}, b"\0" * 8, "unknown dtype"),
    "huge integer": (
        b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
        b"",
        "out of range",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_case_is_named_error(tmp_path: Path, case: str) -> None:
    header, data, expect = HEADER_CASES[case]
    with pytest.raises(CheckpointError, match=re.escape(expect)) as e:
        read_header(raw_st(tmp_path / "x.safetensors", header, data))
    assert "x.safetensors" in str(e.value)


def test_header_length_never_printed(tmp_path: Path) -> None:
    """The first 8 bytes of a file that is not safetensors must not leak as a number."""
    secret = b"hunter2!" + b"x" * 100
    p = tmp_path / "secret.safetensors"
    p.write_bytes(secret)
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert str(struct.unpack("<Q", secret[:8])[0]) not in str(e.value)


def test_million_tensor_header_is_refused_fast(tmp_path: Path) -> None:
    """~55 MB of header claiming 1M tensors: refused before parsing, with a one-line message."""
    entry = b'"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
    header = b"{" + entry * 1_000_001 + b'"u":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    with pytest.raises(CheckpointError, match="more than 500000 tensors") as e:
        read_header(raw_st(tmp_path / "x.safetensors", header))
    assert len(str(e.value)) < 500


def test_zero_byte_giant_tensor_is_bounded(tmp_path: Path) -> None:
    """[2**62, 0] holds no bytes: accepted like the reference does, read as one empty block."""
    p = raw_st(
        tmp_path / "z.safetensors",
        {"z": {"dtype": "F32", "shape": [1 << 62, 0], "data_offsets": [0, 0]}},
    )
    [ref] = read_header(p).tensors
    assert list(row_blocks(ref, 0, ref.rows, 1)) == [(0, 1 << 62)]
    with FileCache() as files:
        assert RowReader(files).read(ref, 0, ref.rows).numel() == 0


def test_u64_values_read_without_overflow(tmp_path: Path) -> None:
    raw = torch.tensor([0, 1, -1, -(1 << 63)], dtype=torch.int64)  # bit patterns of big U64s
    data = raw.numpy().tobytes()
    p = raw_st(
        tmp_path / "u.safetensors",
        {"u": {"dtype": "U64", "shape": [4], "data_offsets": [0, 32]}},
        data,
    )
    [ref] = read_header(p).tensors
    with FileCache() as files:
        r = RowReader(files)
        x = r.widen(ref, r.read(ref, 0, 4), 0)
    assert x.flatten().tolist() == [0.0, 1.0, float(2**64 - 1), float(2**63)]


@pytest.mark.parametrize("scale", [1e80, 1e155])
def test_f64_values_overflowing_moments_are_named(tmp_path: Path, scale: float) -> None:
    x = torch.randn(16, 4, dtype=torch.float64) * scale
    d = model(tmp_path, {"w": x})
    ref = open_model(d).tensors["w"]
    ts = TensorStats(
        ref,
        TensorRole("w", "other"),
        None,
        "other",
        MomentKernel(resolve_device("cpu"), 1 << 16).moments(x),
        None,
    )
    with pytest.raises(CheckpointError, match="overflow float64 moments") as e:
        tensor_row(ts)
    assert "'w'" in str(e.value) and "model.safetensors" in str(e.value)


def test_file_shrunk_under_the_window_is_named(tmp_path: Path) -> None:
    d = model(tmp_path, {"w": torch.randn(4096, 64)})
    src = open_model(d)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    with FileCache() as files, pytest.raises(CheckpointError, match="shrank or was replaced"):
        RowReader(files).read(src.tensors["w"], 0, 4096)


# --- file kinds, permissions, containment ------------------------------------------------------

KIND_CASES: dict[str, Callable[[Path], None]] = {
    "FIFO weights": lambda d: fifo(d / "model.safetensors") and None,
    "FIFO config": lambda d: fifo(d / "config.json") and None,
    "FIFO index": lambda d: (fifo(d / "model.safetensors.index.json"), None)[1],
    "directory weights": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors").mkdir(),
    )[1],
    "device weights": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors").symlink_to("/dev/zero"),
    )[1],
    "symlink out of the folder": lambda d: (
        (d / "config.json").unlink(),
        (d / "config.json").symlink_to(d.parent / "out.json"),
    )[1],
    "index through a symlinked sub-folder": lambda d: _sub_folder_escape(d),
    "refs/main escape": lambda d: _refs_escape(d),
}


def _sub_folder_escape(d: Path) -> None:
    outside = d.parent / "elsewhere"
    outside.mkdir()
    (d / "model.safetensors").rename(outside / "w.safetensors")
    (d / "sub").symlink_to(outside)
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.embed_tokens.weight": "sub/w.safetensors",
                    "model.layers.0.mlp.up_proj.weight": "sub/w.safetensors",
                }
            }
        )
    )


def _refs_escape(d: Path) -> None:
    (d / "snapshots").mkdir()
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("../../etc")
    for f in ("model.safetensors",):
        (d / f).rename(d / "snapshots" / f)


@pytest.mark.parametrize("case", sorted(KIND_CASES))
def test_file_kind_and_containment(tmp_path: Path, case: str) -> None:
    (tmp_path / "out.json").write_text(json.dumps(CONFIG))
    d = model(tmp_path)
    KIND_CASES[case](d)
    with pytest.raises(CheckpointError) as e:
        open_model(d)
    msg = str(e.value)
    assert str(d) in msg and "Traceback" not in msg


def test_hf_cache_blobs_are_inside(tmp_path: Path) -> None:
    """Snapshot symlinks into the cache repository's blobs/ are the normal layout, not escapes."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(blobs / "b1"))
    (blobs / "b2").write_text(json.dumps(CONFIG))
    (snap / "model.safetensors").symlink_to(blobs / "b1")
    (snap / "config.json").symlink_to(Path("../../blobs/b2"))
    assert "w" in open_model(repo).tensors


def test_permission_error_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root reads through chmod 000, so the denial is simulated where the OS would raise it
    p = tmp_path / "config.json"
    p.write_text("{}")

    def denied(*a: object, **k: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(InputError, match="permission denied") as e:
        read_regular(p, 1 << 20, "config.json")
    assert str(p) in str(e.value)


# --- JSON, config.json ---------------------------------------------------------------------------

CONFIG_CASES: dict[str, tuple[object, str]] = {
    "architectures int": ({**CONFIG, "architectures": 5}, "list of strings"),
    "architectures string": ({**CONFIG, "architectures": "Qwen2ForCausalLM"}, "list of strings"),
    "architectures of ints": ({**CONFIG, "architectures": [1]}, "list of strings"),
    "model_type list": ({**CONFIG, "model_type": ["qwen2"]}, "model_type must be a string"),
    "a billion layers": ({**CONFIG, "num_hidden_layers": 1_000_000_000}, "out of range"),
    "a billion experts": ({**CONFIG, "num_experts": 1_000_000_000}, "out of range"),
    "bool layers": ({**CONFIG, "num_hidden_layers": True}, "must be an integer"),
    "float layers": ({**CONFIG, "num_hidden_layers": 2.5}, "must be an integer"),
    "hidden past every dim": ({**CONFIG, "hidden_size": 1 << 40}, "largest stored dimension"),
    "text_config list": ({**CONFIG, "text_config": [1]}, "text_config must be an object"),
    "text_config billion layers": (
        {**CONFIG, "text_config": {"num_hidden_layers": 10**9}},
        "text_config.num_hidden_layers",
    ),
    "not an object": ([CONFIG], "JSON object"),
    "nested 100k deep": ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper"),
    "Infinity": ('{"num_hidden_layers": Infinity}', "NaN / Infinity"),
    "1e400": ('{"rope_theta": 1e400}', "out of range"),
    "not UTF-8": (b'{"a": "\xff"}', "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_case_is_named_error(tmp_path: Path, case: str) -> None:
    cfg, expect = CONFIG_CASES[case]
    d = model(tmp_path, config=cfg)
    with pytest.raises(CheckpointError, match=re.escape(expect)) as e:
        open_model(d)
    assert "config.json" in str(e.value)


def test_json_depth_limit_is_not_recursion(tmp_path: Path) -> None:
    p = tmp_path / "deep.json"
    p.write_text("[" * 1_000_000 + "]" * 1_000_000)
    with pytest.raises(InputError, match="nests deeper"):
        load_json(p, 16 << 20)


# --- tokenizer ---------------------------------------------------------------------------------

VOCAB_CASES: dict[str, tuple[object, str]] = {
    "a list": ([["a", 0]], "must be a JSON object"),
    "model a list": ({"model": [1]}, "'model' must be an object"),
    "negative id": ({"model": {"vocab": {"a": 0, "b": -1}}}, "ids must be integers"),
    "id past range": ({"model": {"vocab": {"a": 0, "b": 1 << 40}}}, "ids must be integers"),
    "bool id": ({"model": {"vocab": {"a": True}}}, "ids must be integers"),
    "every token id 0": ({"model": {"vocab": {f"t{i}": 0 for i in range(100)}}}, "share only 1"),
    "added tokens not a list": (
        {"model": {"vocab": {"a": 0}}, "added_tokens": {"x": 1}},
        "added_tokens",
    ),
    "unigram junk": ({"model": {"vocab": [1, 2]}}, "Unigram"),
}


@pytest.mark.parametrize("case", sorted(VOCAB_CASES))
def test_tokenizer_case_unusable_with_reason(case: str) -> None:
    doc, expect = VOCAB_CASES[case]
    vocab, why = parse_vocab(doc, "/m/tokenizer.json")
    assert vocab is None and expect in why and "tokenizer.json" in why


def test_tokenizer_fifo_is_named_error(tmp_path: Path) -> None:
    d = model(tmp_path)
    fifo(d / "tokenizer.json")
    with pytest.raises(CheckpointError, match="FIFO"):
        read_vocab(d)


def test_good_tokenizer_still_parses(tmp_path: Path) -> None:
    d = model(tmp_path)
    (d / "tokenizer.json").write_text(zoo.tokenizer_json(50))
    vocab, note = read_vocab(d)
    assert vocab is not None and len(vocab) >= 50 and "tokens" in note


# --- signatures --------------------------------------------------------------------------------


def _signature(tmp_path: Path) -> dict:
    return {
        "format": "npu_fp.signature",
        "schema_version": 1,
        "created_by": "test",
        "identity": {
            "name": "m",
            "path": str(tmp_path),
            "num_layers": 1,
            "num_experts": 0,
            "experts_per_group": 0,
            "files": [{"name": "model.safetensors", "size": 10, "header_sha256": "ab"}],
        },
        "settings": {},
        "tensors": [{"name": "w", "layer": 0, "role": "mlp.up", "std": 1.0}],
        "layers": [{"layer": 0, "role": "mlp.up", "group": None, "std": 1.0}],
        "skipped": [],
        "unmapped": [],
        "warnings": [],
    }


def _edit(doc: dict, path: str, value: object) -> dict:
    keys = path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return doc


_DELETE = object()
SIGNATURE_CASES: dict[str, tuple[str, object, str]] = {
    "identity missing": ("identity", _DELETE, "'identity' must be an object"),
    "name missing": ("identity.name", _DELETE, "identity.name"),
    "files missing": ("identity.files", _DELETE, "identity.files"),
    "a billion layers": ("identity.num_layers", 10**9, "identity.num_layers"),
    "bool layers": ("identity.num_layers", True, "identity.num_layers"),
    "tensors a dict": ("tensors", {"w": 1}, "'tensors' must be a list"),
    "std a string": ("layers.0.std", "1.0", "layers\\[0\\].std"),
    "layer negative": ("layers.0.layer", -1, "layers\\[0\\].layer"),
    "layer row missing role": ("layers.0.role", _DELETE, "layers\\[0\\].role"),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_resealed_signature_case_is_named_error(tmp_path: Path, case: str) -> None:
    field, value, expect = SIGNATURE_CASES[case]
    p = tmp_path / "signature.json"
    p.write_text(dumps(_edit(_signature(tmp_path), field, value)))  # dumps reseals
    with pytest.raises(SignatureError, match=expect) as e:
        load_signature(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "1e200", "9" * 5000])
def test_signature_numbers_out_of_range(tmp_path: Path, text: str) -> None:
    p = tmp_path / "signature.json"
    good = dumps(_signature(tmp_path))
    p.write_text(good.replace('"std": 1.0', f'"std": {text}', 1))
    with pytest.raises(SignatureError) as e:
        load_signature(p)
    assert str(p) in str(e.value)


def test_valid_signature_loads(tmp_path: Path) -> None:
    p = tmp_path / "signature.json"
    p.write_text(dumps(_signature(tmp_path)))
    assert load_signature(p).profile("mlp.up") == [1.0]


def test_signature_fifo_is_named_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="FIFO"):
        load_signature(fifo(tmp_path / "signature.json"))


# --- the CLI: exit 2, a named error, nothing left --------------------------------------------

CLI_CASES: dict[str, Callable[[Path], Path]] = {
    "fifo weights": lambda t: (fifo(model(t) / "model.safetensors"), t / "m")[1],
    "zero-byte giant": lambda t: _giant(t),
    "billion layers": lambda t: model(t, config={**CONFIG, "num_hidden_layers": 10**9}),
    "architectures int": lambda t: model(t, config={**CONFIG, "architectures": 5}),
    "deep config": lambda t: model(t, config='{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
    "bool shape": lambda t: _bool_shape(t),
    "F64 1e155": lambda t: model(
        t,
        {
            "model.embed_tokens.weight": 1e155 * torch.randn(8, 4, dtype=torch.float64),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
        },
    ),
}


def _giant(t: Path) -> Path:
    d = model(t)
    (d / "model.safetensors").unlink()
    raw_st(
        d / "model.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": {
                "dtype": "F32",
                "shape": [1 << 62, 0],
                "data_offsets": [0, 0],
            }
        },
    )
    return d


def _bool_shape(t: Path) -> Path:
    d = model(t)
    raw_st(
        d / "model.safetensors",
        {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    return d


def fingerprint_cli(d: Path, out: Path) -> subprocess.CompletedProcess:
    args = [f"model.path={d}", f"hydra.run.dir={out}", "device=cpu", "progress=false"]
    return run_cli(["-m", "npu_fp", "fingerprint", *args], cwd=out.parent, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_case_exit_2_nothing_left(tmp_path: Path, case: str) -> None:
    d = CLI_CASES[case](tmp_path)
    out = tmp_path / "out"
    r = fingerprint_cli(d, out)
    if case == "zero-byte giant":  # legal per the reference: finishes, bounded, exit 0
        assert r.returncode == 0, r.stderr[-2000:]
        return
    assert r.returncode == 2, r.stderr[-2000:]
    assert "npu-fp: error:" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "signature.json").exists() and not (out / "tensors.csv").exists()


COMPARE_CASES: dict[str, Callable[[Path, Path], None]] = {
    "fifo signature": lambda t, p: (fifo(p), None)[1],
    "forged layer count": lambda t, p: p.write_text(
        dumps(_edit(_signature(t), "identity.num_layers", 10**9))
    ),
    "NaN inside": lambda t, p: p.write_text(
        dumps(_signature(t)).replace('"std": 1.0', '"std": NaN')
    ),
    "deep nesting": lambda t, p: p.write_text("[" * 100_000 + "]" * 100_000),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(COMPARE_CASES))
def test_cli_compare_case_exit_2_nothing_left(tmp_path: Path, case: str) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(dumps(_signature(tmp_path)))
    COMPARE_CASES[case](tmp_path, bad)
    out = tmp_path / "out"
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "compare",
            f"compare.signatures=[{good},{bad}]",
            f"hydra.run.dir={out}",
            "device=cpu",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "npu-fp: error:" in r.stderr and "bad.json" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "report.json").exists()


@pytest.mark.slow
def test_cli_run_dir_is_a_file(tmp_path: Path) -> None:
    d = model(tmp_path)
    out = tmp_path / "out"
    out.write_text("not a directory")
    r = run_cli(
        ["-m", "npu_fp", "fingerprint", f"model.path={d}", f"hydra.run.dir={out}", "device=cpu"],
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2 and "is not a directory" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and out.read_text() == "not a directory"


def fingerprint_after(prelude: str, d: Path, out: Path) -> subprocess.CompletedProcess:
    """The fingerprint CLI in a fresh interpreter that first runs `prelude` (the fault)."""
    code = (
        f"{prelude}import sys\nfrom npu_fp.__main__ import cli\n"
        f"sys.argv = ['npu-fp', 'fingerprint', 'model.path={d}', 'hydra.run.dir={out}', "
        "'device=cpu']\ncli()\n"
    )
    return run_cli(["-c", code], cwd=out.parent, timeout=120)


@pytest.mark.slow
def test_cli_full_disk_is_named(tmp_path: Path) -> None:
    """ENOSPC while writing outputs (simulated at the rename every output goes through)."""
    d = model(tmp_path)
    out = tmp_path / "out"
    prelude = (
        "import errno, os\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), a[1])\n"
        "import npu_fp.io.atomic as atomic\n"
        "atomic.os.replace = full\n"
    )
    r = fingerprint_after(prelude, d, out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "signature.json").exists()


@pytest.mark.slow
def test_cli_locked_run_dir_is_named(tmp_path: Path) -> None:
    """A second run into a run directory another run holds (its lock held here)."""
    d = model(tmp_path)
    out = tmp_path / "out"
    with rundir.lock(out):
        r = fingerprint_cli(d, out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "another npu-fp run" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "signature.json").exists() and not (out / "manifest.json").exists()
    assert not (out / ".hydra").exists()  # refused before Hydra wrote into it


@pytest.mark.slow
def test_cli_compare_stale_signature_is_refused(tmp_path: Path) -> None:
    """Weights swapped under a signature (same header, mtime set back), re-fingerprinting off."""
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4)}
    a, b = model(tmp_path, tensors, name="a"), model(tmp_path, tensors, name="b")
    fp = fingerprint_cli(a, tmp_path / "fa")
    assert fp.returncode == 0, fp.stderr[-2000:]
    st = (a / "model.safetensors").stat()
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4)}, str(a / "model.safetensors")
    )
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    out = tmp_path / "out"
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "compare",
            f"compare.signatures=[{tmp_path / 'fa' / 'signature.json'}]",
            f"compare.models=[{b}]",
            "compare.refingerprint_stale=false",
            f"hydra.run.dir={out}",
            "device=cpu",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "a/model.safetensors: sampled bytes changed" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "report.json").exists()


@pytest.mark.slow
def test_cli_file_size_limit_leaves_nothing_half_written(tmp_path: Path) -> None:
    """A real short write: RLIMIT_FSIZE makes the kernel refuse bytes past 5 kB (EFBIG: the profile plot is ~10 kB), as a
    full disk would, while the outputs are written."""
    d = model(tmp_path)
    out = tmp_path / "out"
    prelude = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # EFBIG from write(), not a kill
        "resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))\n"
    )
    r = fingerprint_after(prelude, d, out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "File too large" in r.stderr and "Traceback" not in r.stderr
    left = {p.name for p in out.iterdir() if p.is_file()}
    assert left <= {".lock"} and not list(out.glob(".staging-*")), left


# --- launch safety -----------------------------------------------------------------------------

EVIL = "import os\nopen(os.environ['EVIL_MARK'], 'a').write(__name__ + '\\n')\n"
SHADOWS = (
    "yaml.py",
    "numpy.py",
    "logging.py",
    "__future__.py",
    "xxhash.py",
    "errno.py",
    "hydra_plugins/evil.py",
)


def hostile_folder(tmp_path: Path) -> Path:
    """A model folder that also carries code: plugins and modules shadowing real ones."""
    d = model(tmp_path)
    for rel in SHADOWS:
        (d / rel).parent.mkdir(exist_ok=True)
        (d / rel).write_text(EVIL)
    return d


@pytest.mark.slow
def test_python_m_from_hostile_folder_runs_nothing_from_it(tmp_path: Path) -> None:
    d = hostile_folder(tmp_path)
    mark = tmp_path / "evil.txt"
    env = {"EVIL_MARK": str(mark), "PYTHONPATH": ""}
    # the fixture is live: the interpreter does import from this folder
    probe = run_cli(["-c", "import yaml"], cwd=d, env=env)
    assert probe.returncode == 0 and mark.read_text() == "yaml\n"
    mark.unlink()
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "fingerprint",
            "model.path=.",
            f"hydra.run.dir={tmp_path / 'o'}",
            "device=cpu",
        ],
        cwd=d,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not mark.exists(), mark.read_text()


@pytest.mark.slow
def test_launcher_from_hostile_folder_runs_nothing_from_it(tmp_path: Path) -> None:
    d = hostile_folder(tmp_path)
    mark = tmp_path / "evil.txt"
    env = {
        "EVIL_MARK": str(mark),
        "NPROC": "1",
        "RUN_DIR": str(tmp_path / "o"),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    r = subprocess.run(
        [str(REPO / "launch" / "run.sh"), "fingerprint", "model.path=.", "device=cpu"],
        cwd=d,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not mark.exists(), mark.read_text()


def test_launchers_and_readme_never_launch_with_dash_m() -> None:
    for f in (REPO / "launch").glob("*.sh"):
        text = f.read_text()
        assert " -m npu_fp" not in text, f
    launches = [
        ln
        for ln in (REPO / "README.md").read_text().splitlines()
        if ln.lstrip().startswith("torchrun")
    ]
    assert launches and all("--no-python npu-fp" in ln for ln in launches), launches
