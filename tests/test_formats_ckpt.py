"""MindSpore `.ckpt` files that real MindSpore wrote (tests/fixtures/mindspore), read without it.

Each fixture folder has a twin `<name>_safetensors` that MindSpore exported from the same
parameters: every per-tensor statistic and content hash must agree exactly between the two.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from compare_fixtures import run_compare
from conftest import run_cli
from formats_helpers import (
    as_bin,
    assert_fingerprint_cli_refuses,
    assert_same_stats,
    fingerprint_rows,
)
from safetensors.torch import load_file, save_file

from npu_fp.arch import map_roles
from npu_fp.compare.tensors import open_view
from npu_fp.io.reader import FileCache, RowReader
from npu_fp.io.safetensors_header import CheckpointError
from npu_fp.io.source import open_model

FIXTURES = Path(__file__).parent / "fixtures" / "mindspore"
MODELS = [
    "llama_fp32_crc",
    "llama_bf16_meta",
    "llama_fp16_sliced",
    "mindformers_llama",
    "mindformers_fused",
    "mindformers_train_state",
    "mindformers_moe",
]


def test_fixtures_match_their_sha256sums() -> None:
    lines = (FIXTURES / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split("  ", 1)) for line in lines if line)
    assert len(sums) == 30  # 15 folders: model file + config.json
    for rel, digest in sums.items():
        assert hashlib.sha256((FIXTURES / rel).read_bytes()).hexdigest() == digest, rel


@pytest.mark.parametrize("name", MODELS)
def test_ckpt_reads_the_same_tensors_as_its_safetensors_export(name: str) -> None:
    ckpt, st = open_model(FIXTURES / name), open_model(FIXTURES / f"{name}_safetensors")
    assert {n: (r.dtype, r.shape) for n, r in ckpt.tensors.items()} == {
        n: (r.dtype, r.shape) for n, r in st.tensors.items()
    }
    with FileCache() as files:
        a, b = RowReader(files), RowReader(files)
        for n, ref in ckpt.tensors.items():
            other = st.tensors[n]
            # every window of 3 rows, so windows that straddle two slices are read too
            for r0 in range(0, ref.rows, 3):
                r1 = min(ref.rows, r0 + 3)
                assert a.read(ref, r0, r1).equal(b.read(other, r0, r1)), (n, r0)


def test_sliced_tensor_is_one_logical_tensor_over_several_values() -> None:
    src = open_model(FIXTURES / "llama_fp16_sliced")
    sliced = {n: r for n, r in src.tensors.items() if r.extra}
    # MindSpore's slice size was lowered to 1 KiB: every fp16 tensor over 1 KiB is split
    assert sliced and all(r.nbytes > 1024 for r in sliced.values())
    assert all(r.nbytes <= 1024 for n, r in src.tensors.items() if n not in sliced)
    emb = sliced["model.embed_tokens.weight"]
    assert len(emb.extra) + 1 == 8 and emb.nbytes == 128 * 32 * 2


def test_append_dict_entries_are_metadata_not_weights() -> None:
    src = open_model(FIXTURES / "llama_bf16_meta")
    assert {"epoch_num", "step_num", "note"}.isdisjoint(src.tensors)
    assert (src.metadata["epoch_num"], src.metadata["step_num"]) == ("3", "70")
    assert src.metadata["note"] == "fixture"


def test_mindformers_names_map_to_the_hf_roles() -> None:
    mf, hf = open_model(FIXTURES / "mindformers_llama"), open_model(FIXTURES / "llama_fp32_crc")
    roles = {}
    for src in (mf, hf):
        rm = map_roles(src.config, {n: r.shape for n, r in src.tensors.items()})
        assert not rm.unmapped
        roles[src.root] = sorted((r.layer or -1, r.role) for r in rm.roles.values())
    assert roles[mf.root] == roles[hf.root]


def test_optimizer_state_is_skipped_not_mapped_as_weights(tmp_path: Path) -> None:
    src = open_model(FIXTURES / "mindformers_train_state")
    rm = map_roles(src.config, {n: r.shape for n, r in src.tensors.items()})
    state = [n for n in src.tensors if n.startswith(("adam_m.", "adam_v."))]
    assert len(state) == 42 and not rm.unmapped
    assert all(rm.roles[n].kind == "aux" for n in [*state, "global_step", "learning_rate"])
    # one attn.q per layer: the Adam moments named after it are not a second one
    assert sorted(r.layer for r in rm.roles.values() if r.role == "attn.q") == [0, 1]
    # statistics for the weights only: the names of the checkpoint without its optimizer state
    rows = fingerprint_rows(FIXTURES / "mindformers_train_state", tmp_path / "out")
    assert sorted(rows) == sorted(fingerprint_rows(FIXTURES / "mindformers_llama", tmp_path / "r"))


def test_mindformers_fused_projections_are_split_into_parts() -> None:
    src = open_model(FIXTURES / "mindformers_fused")
    rm = map_roles(src.config, {n: r.shape for n, r in src.tensors.items()})
    assert not rm.unmapped
    qkv = rm.roles["model.layers.1.attention.w_qkv.weight"]
    assert qkv.role == "attn.qkv"
    assert [(p.role, p.ranges) for p in qkv.parts] == [
        ("attn.q", ((0, 32),)),
        ("attn.k", ((32, 48),)),
        ("attn.v", ((48, 64),)),
    ]
    assert [p.role for p in rm.roles["model.layers.1.attention.w_qkv.bias"].parts] == [
        "attn.q_bias",
        "attn.k_bias",
        "attn.v_bias",
    ]
    gate_up = rm.roles["model.layers.0.feed_forward.w_gate_hidden.weight"]
    assert [(p.role, p.ranges) for p in gate_up.parts] == [
        ("mlp.gate", ((0, 64),)),
        ("mlp.up", ((64, 128),)),
    ]


# MindFormers -> HF names of the MoE fixture's non-expert tensors (layouts doc 3.18)
_MF_TO_HF = {
    "tok_embeddings.embedding_weight": "embed_tokens.weight",
    "norm_out.": "norm.",
    "attention.wq.": "self_attn.q_proj.",
    "attention.wk.": "self_attn.k_proj.",
    "attention.wv.": "self_attn.v_proj.",
    "attention.wo.": "self_attn.o_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
    "feed_forward.routed_experts.router.dense.": "mlp.gate.",
    "feed_forward.shared_experts.w1.": "mlp.shared_expert.gate_proj.",
    "feed_forward.shared_experts.w3.": "mlp.shared_expert.up_proj.",
    "feed_forward.shared_experts.w2.": "mlp.shared_expert.down_proj.",
}
_MF_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _hf_per_expert_copy(dst: Path) -> Path:
    """The MoE fixture as a Qwen2-MoE checkpoint: one [out, in] tensor per expert, the
    transpose of each [in, out] slice of MindFormers' [E, in, out] stacks."""
    src = FIXTURES / "mindformers_moe_safetensors"
    out = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if ".routed_experts.ffn." in name:
            layer, leaf = name.split(".")[2], name.split(".")[-2]
            for e in range(t.shape[0]):
                out[f"model.layers.{layer}.mlp.experts.{e}.{_MF_EXPERT[leaf]}.weight"] = (
                    t[e].t().contiguous()
                )
            continue
        for a, b in _MF_TO_HF.items():
            name = name.replace(a, b)
        out[name] = t
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config |= {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "shared_expert_intermediate_size": config["moe_intermediate_size"],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_mindformers_expert_stacks_are_per_expert_rows_in_out_in_orientation(
    tmp_path: Path,
) -> None:
    """`routed_experts.ffn.w1/w2/w3` [E, in, out] become one transposed row per expert: the same
    roles, statistics and [out, in] matrices as a per-expert HF checkpoint of the same weights."""
    ckpt = FIXTURES / "mindformers_moe"
    src = open_model(ckpt)
    rm = map_roles(src.config, {n: r.shape for n, r in src.tensors.items()})
    assert not rm.unmapped
    experts = {n: r for n, r in rm.roles.items() if r.role.startswith("moe.expert.")}
    assert len(experts) == 2 * 3 * 4 and all(r.transposed for r in experts.values())
    assert not any(".routed_experts.ffn.w" in n for n in src.tensors)  # the stacks are cut up
    hf = _hf_per_expert_copy(tmp_path / "hf")
    a, b = open_view(str(ckpt)), open_view(str(hf))
    keys = [(r.layer, r.role, r.expert) for r in experts.values()]
    keys += [(layer, role, None) for layer in (0, 1) for role in ("moe.router", "moe.shared.down")]
    for key in keys:
        x, y = a.read(*key), b.read(*key)
        assert x is not None and y is not None and x.equal(y), key
        assert a.shape(*key) == tuple(y.shape), key
    rows_a = fingerprint_rows(ckpt, tmp_path / "o1")
    rows_b = fingerprint_rows(hf, tmp_path / "o2")
    by_key = {(r["layer"], r["role"], r.get("expert")): r for r in rows_b.values()}
    seen = 0
    for row in rows_a.values():
        if row["role"].startswith("moe.expert."):
            other = by_key[(row["layer"], row["role"], row.get("expert"))]
            for k in ("numel", "max", "min", "absmax", "nan", "inf"):
                assert row[k] == other[k], (row["name"], k)
            for k in ("mean", "std", "rms", "l2", "kurtosis", "skew"):
                assert row[k] == pytest.approx(other[k], rel=1e-12, abs=1e-15), (row["name"], k)
            seen += 1
    assert seen == len(experts)


@pytest.mark.parametrize("name", MODELS)
def test_fingerprint_statistics_agree_exactly(name: str, tmp_path: Path) -> None:
    a = fingerprint_rows(FIXTURES / name, tmp_path / "ckpt")
    b = fingerprint_rows(FIXTURES / f"{name}_safetensors", tmp_path / "st")
    assert_same_stats(a, b)


# --- bad input: each a named error with the file (and tensor), exit 2, nothing written ---


def _copy(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / name, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _truncated(tmp_path: Path) -> Path:
    d = _copy(tmp_path, "mindformers_llama")
    f = d / "model.ckpt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _patched(name: str, old: bytes, new: bytes, nth: int = 1) -> object:
    def make(tmp_path: Path) -> Path:
        d = _copy(tmp_path, name)
        f = d / "model.ckpt"
        data = f.read_bytes()
        at = -1
        for _ in range(nth):
            at = data.index(old, at + 1)
        f.write_bytes(data[:at] + new + data[at + len(old) :])
        return d

    return make


def _bad_crc(tmp_path: Path) -> Path:
    d = _copy(tmp_path, "llama_fp32_crc")
    f = d / "model.ckpt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a tensor's bytes
    f.write_bytes(bytes(data))
    return d


def _mixed(tmp_path: Path) -> Path:
    d = _copy(tmp_path, "llama_fp32_crc")
    shutil.copy(FIXTURES / "llama_fp32_crc_safetensors" / "model.safetensors", d)
    return d


def _two_ckpts(tmp_path: Path) -> Path:
    d = _copy(tmp_path, "llama_fp32_crc")
    shutil.copy(d / "model.ckpt", d / "model-step2.ckpt")
    return d


# case -> (builder, what the message must say)
BAD: dict[str, tuple[object, list[str]]] = {
    "truncated": (_truncated, ["model.ckpt", "tensor 'model.layers.", "truncated"]),
    # the tensor_type field key (0x12) of the second Value's TensorProto turned into field 15
    # (MindSpore writes the parameters in the order given: embedding, final norm, lm_head, ...)
    "corrupt field key": (
        _patched("mindformers_llama", b"\x12\x07Float32", b"\x7a\x07Float32", nth=2),
        ["model.ckpt", "tensor 'model.norm_out.weight'", "unexpected protobuf"],
    ),
    "unknown tensor_type": (
        _patched("mindformers_llama", b"Float32", b"Float99", nth=3),
        ["model.ckpt", "tensor 'lm_head.weight'", "'Float99'"],
    ),
    "bad CRC": (_bad_crc, ["model.ckpt", "CRC32 check failed"]),
    "encrypted": (lambda t: _copy(t, "encrypted"), ["model.ckpt", "encrypted", "enc_key"]),
    "mixed formats": (_mixed, ["several formats", "mindspore: model.ckpt"]),
    "two checkpoints": (_two_ckpts, ["2 mindspore files", "not shards"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_ckpt_is_a_named_error(tmp_path: Path, case: str) -> None:
    build, words = BAD[case]
    d = build(tmp_path)  # type: ignore[operator]
    with pytest.raises(CheckpointError) as e:
        open_model(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_ckpt_cli_exit_2_nothing_left(tmp_path: Path, case: str) -> None:
    build, words = BAD[case]
    d = build(tmp_path)  # type: ignore[operator]
    assert_fingerprint_cli_refuses(d, tmp_path / "out", words, cwd=tmp_path)


def test_compare_calls_the_bin_and_ckpt_copies_related(tmp_path: Path) -> None:
    st = FIXTURES / "llama_fp32_crc_safetensors"
    copies = [st, FIXTURES / "llama_fp32_crc", as_bin(st, tmp_path / "bin")]
    doc = run_compare(copies, tmp_path / "out", cache_dir=str(tmp_path / "cache"))
    assert len(doc["pairs"]) == 3
    for p in doc["pairs"]:
        assert p["verdict"] == "related", (p["a"], p["b"], p["reason"])
        assert p["decided_by"]["family"] == "identical_bytes"


@pytest.mark.slow
def test_sliced_ckpt_and_bin_signatures_identical_for_1_and_2_ranks(tmp_path: Path) -> None:
    """Row segments that straddle two slices are read on whichever rank the plan gives them."""
    models = {"ckpt": FIXTURES / "llama_fp16_sliced"}
    models["bin"] = as_bin(FIXTURES / "llama_fp16_sliced_safetensors", tmp_path / "bin")
    for fmt, model in models.items():
        sigs = []
        for n in (1, 2):
            out = tmp_path / f"{fmt}-{n}"
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            args += ["-m", "npu_fp", "fingerprint", f"model.path={model}", f"hydra.run.dir={out}"]
            args += ["plan.segment_bytes=4096", "stats.read_bytes=4096", "progress=false"]
            r = run_cli([*args, "device=cpu"], cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-3000:]
            sigs.append((out / "signature.json").read_bytes())
        assert sigs[0] == sigs[1], fmt


def test_crc_is_checked_again_after_the_file_changes(tmp_path: Path) -> None:
    d = _copy(tmp_path, "llama_fp32_crc")
    open_model(d)  # verified once; the same file is not read again for its CRC
    f = d / "model.ckpt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(f, "r+b") as fh:  # in place: same inode and size
        fh.write(bytes(data))
    with pytest.raises(CheckpointError, match="CRC32 check failed"):
        open_model(d)
