"""Property tests over every parser of user files: any input gives a parsed result or the named
error type (`InputError`), never another exception.

Examples are kept few (`max_examples`) so the suite stays fast; hypothesis's own shrinking turns a
failure into a minimal input.
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from npu_fp.io.safetensors_header import DTYPE_BITS, read_header
from npu_fp.io.source import open_model
from npu_fp.io.validate import InputError, check_config, loads_json, parse_vocab
from npu_fp.signature import dumps, load_signature

# no example database: runs leave nothing behind in the work tree
FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# JSON values, including the types a hostile file would use in the wrong place
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
dims = st.one_of(
    st.integers(0, 8), st.integers(-3, 2**64), st.booleans(), st.floats(0, 4), st.just(2**62)
)


FUZZ_DIR = Path(tempfile.mkdtemp(prefix="npu_fp_fuzz_"))
atexit.register(shutil.rmtree, FUZZ_DIR, True)


def _tmp() -> Path:
    """One scratch folder for the module: each example overwrites the files it writes."""
    return FUZZ_DIR


def _write_st(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_as_safetensors(blob: bytes) -> None:
    p = _tmp() / "x.safetensors"
    p.write_bytes(blob)
    try:
        read_header(p)
    except InputError:
        pass


entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), json_values),
        "shape": st.one_of(st.lists(dims, max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(dims, min_size=2, max_size=2), json_values),
    }
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=6), st.one_of(entries, json_values), max_size=4),
    st.one_of(st.none(), json_values),
    st.integers(0, 64),
)
def test_structured_safetensors_headers(tensors: dict, metadata: object, data_len: int) -> None:
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    p = _write_st(_tmp() / "x.safetensors", json.dumps(header).encode(), bytes(data_len))
    try:
        h = read_header(p)
    except InputError:
        return
    # what parses tiles the data region exactly, in order
    cursor = 8 + h.header_len
    for r in h.tensors:
        assert r.begin == cursor and r.end >= r.begin
        cursor = r.end
    assert cursor == h.size


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        json_values.map(json.dumps),
    )
)
def test_loads_json_any_text(text: str) -> None:
    try:
        loads_json(text.encode("utf-8", "surrogatepass"), "f.json")
    except InputError:
        pass


@FUZZ
@given(json_values, st.lists(st.lists(st.integers(0, 64), max_size=3), max_size=5))
def test_check_config_any_json(config: object, shapes: list[list[int]]) -> None:
    if not isinstance(config, dict):
        config = {"architectures": config, "num_hidden_layers": config}
    try:
        check_config(config, "config.json", [tuple(s) for s in shapes])
    except InputError:
        pass


@FUZZ
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "model": st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {
                            "vocab": st.one_of(
                                json_values,
                                st.dictionaries(
                                    st.text(max_size=4),
                                    st.one_of(st.integers(-5, 2**40), scalars),
                                    max_size=20,
                                ),
                            )
                        }
                    ),
                ),
                "added_tokens": json_values,
            }
        ),
    ),
    st.sampled_from(["tokenizer.json", "vocab.json"]),
)
def test_parse_vocab_any_json(doc: object, fmt: str) -> None:
    vocab, why = parse_vocab(doc, f"/m/{fmt}", fmt)
    assert isinstance(why, str)
    if vocab is not None:
        assert all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in vocab.items())


MODEL = FUZZ_DIR / "model"
MODEL.mkdir()
save_file({"w": torch.ones(2, 2)}, str(MODEL / "model.safetensors"))


@FUZZ
@given(
    json_values,
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "weight_map": st.dictionaries(
                    st.text(max_size=6),
                    st.one_of(
                        st.sampled_from(
                            ["model.safetensors", "../x", "/etc/passwd", "sub/../model.safetensors"]
                        ),
                        json_values,
                    ),
                    max_size=3,
                )
            }
        ),
    ),
)
def test_open_model_any_config_and_index(config: object, index: object) -> None:
    (MODEL / "config.json").write_text(json.dumps(config))
    (MODEL / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        open_model(MODEL)
    except InputError:
        pass


SIG = {
    "format": "npu_fp.signature",
    "schema_version": 1,
    "created_by": "fuzz",
    "identity": {
        "name": "m",
        "path": None,
        "num_layers": 1,
        "num_experts": 0,
        "experts_per_group": 0,
        "files": [],
    },
    "settings": {},
    "tensors": [{"name": "w", "layer": 0, "role": "mlp.up", "std": 1.0}],
    "layers": [{"layer": 0, "role": "mlp.up", "group": None, "std": 1.0}],
}


@FUZZ
@given(
    st.sampled_from(
        [
            "identity",
            "tensors",
            "layers",
            "settings",
            "activations",
            "identity.num_layers",
            "identity.files",
            "identity.name",
            "tensors.0",
            "tensors.0.std",
            "tensors.0.layer",
            "layers.0",
            "layers.0.layer",
            "layers.0.std",
            "layers.0.group",
        ]
    ),
    json_values,
)
def test_resealed_signature_any_field(field: str, value: object) -> None:
    doc = json.loads(json.dumps(SIG))
    node = doc
    keys = field.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    node[int(last) if isinstance(node, list) else last] = value
    p = _tmp() / "signature.json"
    p.write_text(dumps(doc))
    try:
        sig = load_signature(p)
    except InputError:
        return
    for row in sig.layers:  # what loads is usable by the profile code
        sig.profile(row["role"])


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_as_signature(blob: bytes) -> None:
    p = _tmp() / "signature.json"
    p.write_bytes(blob)
    try:
        load_signature(p)
    except InputError:
        pass
