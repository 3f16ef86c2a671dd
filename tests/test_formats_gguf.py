"""GGUF read directly, and fused 3-D expert tensors in safetensors.

GGUF fixtures are written with the `gguf` library's own writer and quantizers (llama.cpp's
converter conventions: q/k rows permuted for llama, Gemma norm gains stored as 1 + w), from the
same weights as a safetensors copy, so every statistic and every read is checked against the
HF-layout original.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from compare_fixtures import SHAPE, pair, run_compare
from conftest import REPO
from formats_helpers import assert_fingerprint_cli_refuses

from npu_fp import derive, realweights, zoo
from npu_fp.commands import fingerprint_into
from npu_fp.compare.tensors import open_view
from npu_fp.config import RunConfig
from npu_fp.dist import distributed
from npu_fp.io.safetensors_header import CheckpointError
from npu_fp.io.source import open_model
from npu_fp.report import profile_plot

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
HF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, arch: str) -> str:
    module, _, param = hf.rpartition(".")
    if module in HF_GLOBAL:
        return f"{HF_GLOBAL[module]}.{param}"
    parts = module.split(".")
    layer, local = parts[2], ".".join(parts[3:])
    table = {**HF_TO_GGUF, **(GEMMA_NORMS if arch.startswith("gemma") else {})}
    return f"blk.{layer}.{table[local]}.{param}"


def write_gguf(
    path: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    arch: str,
    qtype: Q | None = None,
    tokens: list[str] | None = None,
    split_max_tensors: int = 0,
    expert_stacks: bool = True,
) -> Path:
    """HF-layout weights as a GGUF file the way llama.cpp converts them; 2-D weights in
    `qtype` (everything else F32). With `split_max_tensors`, gguf-split shards
    NAME-0000i-of-0000n.gguf next to `path`; without `expert_stacks`, one tensor per expert
    (`blk.N.ffn_gate.E.weight`, older llama.cpp Mixtral conversions)."""
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(config["num_hidden_layers"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_context_length(4096)
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if config.get("num_experts"):
        w.add_expert_count(config["num_experts"])
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if tokens is not None:
        w.add_token_list(tokens)
    stacks: dict[str, list[np.ndarray]] = {}
    for name, t in sorted(tensors.items()):
        a = t.float().numpy()
        if ".experts." in name:  # blk stack: ffn_{gate,up,down}_exps [E, out, in]
            parts = name.split(".")
            leaf = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
            if not expert_stacks:
                w.add_tensor(f"blk.{parts[2]}.{leaf[parts[6]]}.{parts[5]}.weight", a)
                continue
            key = f"blk.{parts[2]}.{leaf[parts[6]]}_exps.weight"
            stacks.setdefault(key, []).append(a)
            continue
        g = gguf_name(name, arch)
        if arch == "llama" and g.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if "attn_q" in g else "num_key_value_heads"]
            a = rope_permute(a, heads)
        if arch.startswith("gemma") and g.endswith("norm.weight"):
            a = a + 1.0
        if qtype is not None and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(a))
    for key, experts in stacks.items():
        w.add_tensor(key, np.stack(experts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokens_of(tokenizer: str) -> list[str]:
    vocab = json.loads(tokenizer)["model"]["vocab"]
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def llama_base(root: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The comparison zoo's base as a Llama (no biases), fp32 safetensors."""
    t = {k: v for k, v in zoo.dense_tensors(SHAPE, seed).items() if not k.endswith(".bias")}
    config = {**zoo.qwen2_config(SHAPE), "architectures": ["LlamaForCausalLM"]}
    config["model_type"] = "llama"
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    return zoo.write_checkpoint(root / "hf", t, config, torch.float32, tok), t, config


def fingerprint_rows(models: dict[str, Path], out: Path) -> dict[str, dict[tuple, dict]]:
    cfg = RunConfig(command="fingerprint", out_dir=str(out), progress=False, device="cpu")
    rows = {}
    with pytest.MonkeyPatch.context() as mp, distributed("cpu") as ctx:
        mp.setattr(profile_plot, "plot_profiles", lambda sigs, path, stat="std": path)
        for name, path in models.items():
            sig = fingerprint_into(ctx, cfg, str(path), out / name, name)
            assert sig is not None
            rows[name] = {(r["layer"], r["role"], r["expert"], r["part"]): r for r in sig.tensors}
    return rows


STATS = ("mean", "std", "rms", "absmax", "min", "max", "l2", "skew", "kurtosis")


def assert_rows_agree(a: dict, b: dict, rel: float, stats: tuple[str, ...] = STATS) -> None:
    assert a.keys() == b.keys()
    for key, ra in a.items():
        rb = b[key]
        assert ra["numel"] == rb["numel"], key
        scale = rb["std"] or 1.0
        for s in stats:
            tol = rel * (scale if s in ("mean", "min", "max") else abs(rb[s]) + 1e-12)
            assert abs(ra[s] - rb[s]) <= tol, (key, s, ra[s], rb[s])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gguf_llama")
    hf, tensors, config = llama_base(root)
    tokens = tokens_of(zoo.tokenizer_json(SHAPE["vocab_size"]))
    return {
        "hf": hf,
        "tensors": tensors,
        "f32": write_gguf(root / "f32.gguf", tensors, config, "llama", tokens=tokens),
        "q8": write_gguf(root / "q8.gguf", tensors, config, "llama", Q.Q8_0, tokens),
        "q4": write_gguf(root / "q4.gguf", tensors, config, "llama", Q.Q4_1, tokens),
        "root": root,
    }


def test_f32_gguf_gives_the_statistics_of_the_safetensors_copy(llama: dict) -> None:
    rows = fingerprint_rows({"hf": llama["hf"], "f32": llama["f32"]}, llama["root"] / "fp32")
    assert_rows_agree(rows["f32"], rows["hf"], 1e-12)
    assert {r["dtype"] for r in rows["f32"].values()} == {"F32"}


def test_quantised_gguf_statistics_within_quantisation_error_with_storage_type(llama: dict) -> None:
    rows = fingerprint_rows(
        {"hf": llama["hf"], "q8": llama["q8"], "q4": llama["q4"]}, llama["root"] / "fpq"
    )
    for name, qtype, rel in (("q8", "Q8_0", 2e-2), ("q4", "Q4_1", 1e-1)):
        r = rows[name]
        assert r[(0, "attn.q", None, "")]["dtype"] == qtype
        assert r[(0, "norm.input", None, "")]["dtype"] == "F32"  # norms stay F32: exact
        norms = {k: v for k, v in r.items() if "norm" in k[1]}
        assert_rows_agree(norms, {k: rows["hf"][k] for k in norms}, 1e-12)
        assert_rows_agree(r, rows["hf"], rel, ("mean", "std", "rms", "l2"))
    # Q4_1 is coarser than Q8_0: its std error is larger (statistics are of dequantised values)
    err = {
        n: abs(
            rows[n][(1, "mlp.up", None, "")]["std"] / rows["hf"][(1, "mlp.up", None, "")]["std"] - 1
        )
        for n in ("q8", "q4")
    }
    assert 0 < err["q8"] < err["q4"]


def test_reads_undo_the_rope_row_permutation(llama: dict) -> None:
    hf, g = open_view(str(llama["hf"])), open_view(str(llama["f32"]))
    stored = gguf.GGUFReader(str(llama["f32"]))
    raw = {t.name: np.array(t.data) for t in stored.tensors}
    for layer in range(SHAPE["num_hidden_layers"]):
        for role, name in (("attn.q", "attn_q"), ("attn.k", "attn_k"), ("mlp.up", "ffn_up")):
            a, b = g.read(layer, role), hf.read(layer, role)
            assert torch.equal(a, b), (layer, role)
            permuted = not np.array_equal(raw[f"blk.{layer}.{name}.weight"], b.numpy())
            assert permuted == (role != "mlp.up")  # the file really holds the permuted rows
    # rows read a few at a time, cutting through the 16-row heads, in HF order all the same
    from npu_fp.io.reader import FileCache, RowReader

    ref = open_model(llama["f32"]).tensors["blk.1.attn_q.weight"]
    with FileCache() as files:
        reader = RowReader(files)
        pieces = [reader.read(ref, r, min(r + 5, ref.rows)).clone() for r in range(0, ref.rows, 5)]
        reader.release()
    assert torch.equal(torch.cat(pieces), hf.read(1, "attn.q"))
    q = open_view(str(llama["q4"]))
    a, b = q.read(0, "attn.q"), hf.read(0, "attn.q")
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.98  # row by row
    # the vocabulary comes from the GGUF metadata
    assert g.vocab == hf.vocab and g.vocab is not None
    for v in (hf, g, q):
        v.close()


def test_quantised_read_equals_the_library_dequantisation(llama: dict) -> None:
    """Rows decoded by byte range, block by block, are gguf's own dequantisation of the tensor."""
    from npu_fp.io.reader import FileCache, RowReader

    src = open_model(llama["q4"])
    stored = {t.name: t for t in gguf.GGUFReader(str(llama["q4"])).tensors}
    ref = src.tensors["blk.0.ffn_down.weight"]
    whole = gguf.quants.dequantize(stored[ref.name].data, Q.Q4_1)
    with FileCache() as files:
        reader = RowReader(files)
        pieces = [reader.read(ref, r, min(r + 5, ref.rows)).clone() for r in range(0, ref.rows, 5)]
        reader.release()
    assert np.array_equal(torch.cat(pieces).numpy(), whole)
    assert src.files[0].name == "q4.gguf" and src.root == str(llama["q4"])


def test_gemma_norm_offset_and_qk_norms(tmp_path: Path) -> None:
    shape = {**SHAPE, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}
    g = torch.Generator().manual_seed(3)
    t = {k: v for k, v in zoo.dense_tensors(shape, 3).items() if not k.endswith(".bias")}
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = 0.02 * torch.randn(128, 64, generator=g)
        t[p + "self_attn.k_proj.weight"] = 0.02 * torch.randn(64, 64, generator=g)
        t[p + "self_attn.v_proj.weight"] = 0.02 * torch.randn(64, 64, generator=g)
        t[p + "self_attn.o_proj.weight"] = 0.02 * torch.randn(64, 128, generator=g)
        for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = 0.1 * torch.randn(64, generator=g)
        for n in ("self_attn.q_norm", "self_attn.k_norm"):
            t[p + n + ".weight"] = 0.1 * torch.randn(64, generator=g)
    for k in t:  # Gemma gains are stored as w, applied as 1 + w
        if k.endswith("norm.weight"):
            t[k] = t[k] - 1.0 if t[k].mean() > 0.5 else t[k]
    del t["lm_head.weight"]
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **shape,
        "tie_word_embeddings": True,
    }
    tok = zoo.tokenizer_json(shape["vocab_size"])
    hf = zoo.write_checkpoint(tmp_path / "hf", t, config, torch.float32, tok)
    gg = write_gguf(tmp_path / "g.gguf", t, config, "gemma3", tokens=tokens_of(tok))
    rows = fingerprint_rows({"hf": hf, "g": gg}, tmp_path / "fp")
    norms = {k for k in rows["hf"] if "norm" in k[1]}
    assert_rows_agree(
        {k: v for k, v in rows["g"].items() if k not in norms},
        {k: v for k, v in rows["hf"].items() if k not in norms},
        1e-12,
    )
    # float32 (1 + w) - 1 rounds w to the spacing of float32 at 1 (about 1e-7)
    assert_rows_agree(
        {k: rows["g"][k] for k in norms}, {k: rows["hf"][k] for k in norms}, 1e-5, STATS[:4]
    )
    row = rows["g"][(1, "norm.mlp_out", None, "")]
    assert row["norm_offset"] == 1.0 and abs(row["mean"]) < 0.2  # stored 1 + w, read as w
    assert (0, "attn.k_norm", None, "") in rows["g"]


def moe_tensors(seed: int = 5, experts: int = 4) -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny Qwen3-MoE with per-expert tensors (HF names)."""
    shape = {**SHAPE, "num_hidden_layers": 2}
    t = {k: v for k, v in zoo.dense_tensors(shape, seed).items() if not k.endswith(".bias")}
    g = torch.Generator().manual_seed(seed)
    inter = 64
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        for k in ("gate_proj", "up_proj", "down_proj"):
            del t[p + k + ".weight"]
        t[p + "gate.weight"] = 0.02 * torch.randn(experts, 64, generator=g)
        for e in range(experts):
            q = f"{p}experts.{e}."
            t[q + "gate_proj.weight"] = 0.02 * torch.randn(inter, 64, generator=g)
            t[q + "up_proj.weight"] = 0.02 * torch.randn(inter, 64, generator=g)
            t[q + "down_proj.weight"] = 0.01 * torch.randn(64, inter, generator=g)
    config = {
        **zoo.qwen2_config(shape),
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": experts,
        "moe_intermediate_size": inter,
        "num_experts_per_tok": 2,
        "head_dim": 16,
    }
    return t, config


def fuse_experts(t: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """transformers-5 layout: mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]."""
    out = {k: v for k, v in t.items() if ".experts." not in k}
    layers = sorted({int(k.split(".")[2]) for k in t if ".experts." in k})
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack(
            [
                torch.cat([t[f"{p}{e}.gate_proj.weight"], t[f"{p}{e}.up_proj.weight"]])
                for e in range(experts)
            ]
        )
        out[p + "down_proj"] = torch.stack([t[f"{p}{e}.down_proj.weight"] for e in range(experts)])
    return out


def test_qwen3_moe_gguf_expert_stacks_are_per_expert_rows(tmp_path: Path) -> None:
    t, config = moe_tensors()
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    hf = zoo.write_checkpoint(tmp_path / "hf", t, config, torch.float32, tok)
    gg = write_gguf(tmp_path / "moe.gguf", t, config, "qwen3moe", tokens=tokens_of(tok))
    rows = fingerprint_rows({"hf": hf, "g": gg}, tmp_path / "fp")
    assert_rows_agree(rows["g"], rows["hf"], 1e-12)
    assert (1, "moe.expert.down", 3, "") in rows["g"] and (0, "moe.router", None, "") in rows["g"]
    assert rows["g"][(1, "moe.expert.down", 3, "")]["name"] == "blk.1.experts.3.ffn_down.weight"


def test_fused_expert_stacks_give_the_per_expert_statistics(tmp_path: Path) -> None:
    t, config = moe_tensors()
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    unfused = zoo.write_checkpoint(tmp_path / "unfused", t, config, torch.float32, tok)
    fused = zoo.write_checkpoint(tmp_path / "fused", fuse_experts(t, 4), config, torch.float32, tok)
    rows = fingerprint_rows({"unfused": unfused, "fused": fused}, tmp_path / "fp")
    f, u = rows["fused"], rows["unfused"]
    for layer in range(2):
        for e in range(4):
            for part, role in (("gate", "moe.expert.gate"), ("up", "moe.expert.up")):
                a, b = f[(layer, role, e, part)], u[(layer, role, e, "")]
                assert all(a[s] == b[s] for s in STATS + ("numel",)), (layer, e, part)
            a, b = f[(layer, "moe.expert.down", e, "")], u[(layer, "moe.expert.down", e, "")]
            assert a["hash"] == b["hash"] and a["name"] == b["name"]  # same bytes, same name
            whole = f[(layer, "moe.expert.gate_up", e, "")]
            assert whole["numel"] == 2 * b["numel"]
    view = open_view(str(fused))
    assert view.experts(1) == [0, 1, 2, 3]
    assert torch.equal(
        view.read(1, "moe.expert.up", 2), t["model.layers.1.mlp.experts.2.up_proj.weight"]
    )
    view.close()


def test_fused_and_unfused_moe_and_gguf_copies_are_related(tmp_path: Path) -> None:
    t, config = moe_tensors()
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    unfused = zoo.write_checkpoint(tmp_path / "unfused", t, config, torch.float32, tok)
    fused = zoo.write_checkpoint(tmp_path / "fused", fuse_experts(t, 4), config, torch.float32, tok)
    gg = write_gguf(tmp_path / "moe.gguf", t, config, "qwen3moe", Q.Q8_0, tokens_of(tok))
    report = run_compare([unfused, fused, gg], tmp_path / "cmp")
    for a, b in (("unfused", "fused"), ("unfused", "moe.gguf"), ("fused", "moe.gguf")):
        p = pair(report, a, b)
        assert p["verdict"] == "related", (a, b, p["reason"])


def test_gguf_copies_of_the_zoo_base_are_related(llama: dict) -> None:
    report = run_compare([llama["hf"], llama["q8"], llama["q4"]], llama["root"] / "cmp")
    for a, b in (("hf", "q8.gguf"), ("hf", "q4.gguf"), ("q8.gguf", "q4.gguf")):
        p = pair(report, a, b)
        assert p["verdict"] == "related", (a, b, p["reason"])


# --- bad input -------------------------------------------------------------------------------


def _type_field_offset(path: Path, index: int = 0) -> int:
    """Byte offset of tensor `index`'s ggml type in its tensor info."""
    field = gguf.GGUFReader(str(path)).tensors[index].field
    name_len = int(field.parts[0][0])
    n_dims = int(field.parts[2][0])
    return field.offset + 8 + name_len + 4 + 8 * n_dims


def _first_tensor(path: Path) -> str:
    return gguf.GGUFReader(str(path)).tensors[0].name


def bad_copy(src: Path, dst: Path, kind: str) -> tuple[Path, str]:
    data = bytearray(src.read_bytes())
    if kind == "truncated_data":
        data = data[: len(data) - 100]
        last = gguf.GGUFReader(str(src)).tensors[-1].name
        return _write(dst, data), f"tensor '{last}'.*truncated"
    if kind == "truncated_header":
        return _write(dst, data[:300]), "GGUF header runs past the end of the file"
    if kind == "bad_magic":
        data[:4] = b"GGUX"
        return _write(dst, data), "not a readable GGUF file"
    if kind == "unknown_type":
        off = _type_field_offset(src)
        data[off : off + 4] = struct.pack("<I", 77)
        return _write(
            dst, data
        ), f"tensor '{_first_tensor(src)}': unknown ggml quantization type 77"
    if kind == "undecodable_type":
        off = _type_field_offset(src)
        data[off : off + 4] = struct.pack("<I", int(Q.Q8_K))
        return _write(dst, data), f"tensor '{_first_tensor(src)}'.*Q8_K"
    raise AssertionError(kind)


def _write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


BAD = ("truncated_data", "truncated_header", "bad_magic", "unknown_type", "undecodable_type")


@pytest.mark.parametrize("kind", BAD)
def test_bad_gguf_is_a_named_error(llama: dict, tmp_path: Path, kind: str) -> None:
    path, message = bad_copy(llama["q8"], tmp_path / f"{kind}.gguf", kind)
    with pytest.raises(CheckpointError, match=message) as e:
        open_model(path)
    assert str(path) in str(e.value)


def test_bad_gguf_stops_the_cli_with_exit_2_and_no_output(llama: dict, tmp_path: Path) -> None:
    path, message = bad_copy(llama["q8"], tmp_path / "bad.gguf", "unknown_type")
    words = ("unknown ggml quantization type 77",)
    assert_fingerprint_cli_refuses(path, tmp_path / "out", words, cwd=REPO)


def test_gguf_of_an_unmapped_architecture_is_refused(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'mamba' is not mapped"):
        open_model(tmp_path / "m.gguf")


def test_folder_of_gguf_files_names_them(llama: dict, tmp_path: Path) -> None:
    os.link(llama["q8"], tmp_path / "q8.gguf")
    with pytest.raises(CheckpointError, match=r"or pass one of the GGUF files \['q8.gguf'\]"):
        open_model(tmp_path)


# --- the real GGUF models (realweights S and G) ----------------------------------------------

CACHE = Path(
    os.environ.get("NPU_FP_REAL_CACHE", Path.home() / ".cache" / "npu_fp" / "real-weights")
)


@pytest.fixture(scope="module")
def real() -> dict[str, Path]:
    return realweights.prepare(CACHE, ("S", "G"))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["S", "G"])
def test_real_gguf_agrees_with_its_safetensors_copy_and_is_related(
    real: dict[str, Path], tmp_path: Path, key: str
) -> None:
    gguf_file = CACHE / "files" / f"{key}.gguf"
    rows = fingerprint_rows({"gguf": gguf_file, "st": real[key]}, tmp_path / "fp")
    g, s = rows["gguf"], rows["st"]
    exact = {k: v for k, v in g.items() if v["dtype"] == "F32"}
    assert len(exact) > 30  # the norms: exact, the copy holds them in bf16 without loss
    assert_rows_agree(exact, {k: s[k] for k in exact}, 1e-12)
    # the safetensors copy is the dequantised values rounded to bf16: agreement to bf16 error
    assert_rows_agree(g, s, 1e-3, ("mean", "std", "rms", "l2"))
    report = run_compare([gguf_file, real[key]], tmp_path / "cmp")
    p = pair(report, f"{key}.gguf", key)
    assert p["verdict"] == "related", p["reason"]


@pytest.mark.slow
def test_requantised_q8_0_gguf_of_a_real_model_is_related(
    real: dict[str, Path], tmp_path: Path
) -> None:
    base = realweights.first_layers(real["S"], tmp_path / "S4", 4)
    tensors, config, tok = derive.load_base(base)
    q8 = write_gguf(tmp_path / "S4-q8.gguf", tensors, config, "llama", Q.Q8_0, tokens_of(tok))
    assert open_model(q8).tensors["blk.0.attn_q.weight"].dtype == "Q8_0"
    report = run_compare([base, q8], tmp_path / "cmp")
    p = pair(report, "S4", "S4-q8.gguf")
    assert p["verdict"] == "related", p["reason"]


def test_activations_refuse_a_gguf_model_by_name(llama: dict) -> None:
    from npu_fp.activations import run_activations
    from npu_fp.config import ActivationsConfig
    from npu_fp.forward.errors import UnsupportedArchitectureError

    source = open_model(llama["q8"])
    with distributed("cpu") as ctx, pytest.raises(UnsupportedArchitectureError, match="GGUF"):
        run_activations(ctx, ActivationsConfig(), source.root, source)


def test_corrupted_gguf_bytes_give_a_named_error_or_a_model(llama: dict, tmp_path: Path) -> None:
    """Seeded byte flips and cuts anywhere in the header: never another exception, never a hang."""
    src = llama["q8"].read_bytes()
    header_end = gguf.GGUFReader(str(llama["q8"])).data_offset
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "read": 0}
    for i in range(150):
        data = bytearray(src)
        if i % 3 == 0:
            data = data[: int(rng.integers(0, header_end))]
        else:
            for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
                data[pos] = int(rng.integers(0, 256))
        path = _write(tmp_path / f"c{i}.gguf", data)
        try:
            open_model(path)
            outcomes["read"] += 1
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50  # the corruptions were noticed, not all silently accepted


def _can_dequantize(t: Q) -> bool:
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except NotImplementedError:
        return False
    return True


DECODABLE = [
    t
    for t in Q
    if t not in (Q.F32, Q.F16) and gguf.GGML_QUANT_SIZES[t][0] <= 256 and _can_dequantize(t)
]


@pytest.mark.parametrize("qtype", DECODABLE, ids=lambda t: t.name)
def test_every_type_gguf_dequantizes_reads_by_rows_as_gguf_decodes_it(
    tmp_path: Path, qtype: Q
) -> None:
    """Random blocks of each type: rows read 3 at a time equal gguf's dequantisation of the whole
    tensor (NaN where a random scale is NaN), and the CSV type is the ggml type."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (10, 256 // block * size), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 256), ("attention.head_count", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from npu_fp.io.reader import FileCache, RowReader

    ref = open_model(tmp_path / "t.gguf").tensors["blk.0.ffn_up.weight"]
    assert ref.dtype == qtype.name and ref.shape == (10, 256)
    with FileCache() as files:
        reader = RowReader(files)
        rows = torch.cat([reader.read(ref, r, min(r + 3, 10)).clone() for r in range(0, 10, 3)])
        reader.release()
    with np.errstate(invalid="ignore", over="ignore"):  # random scales hold NaN and Inf
        expected = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(rows.float().numpy(), expected, equal_nan=True)


def test_activations_run_a_fused_expert_checkpoint_like_the_unfused_one(tmp_path: Path) -> None:
    import shutil

    from forward_helpers import save_hf_model
    from safetensors.torch import load_file

    from npu_fp.activations import run_activations
    from npu_fp.config import ActivationsConfig

    unfused = tmp_path / "unfused"
    save_hf_model("qwen3_moe", unfused)
    config = json.loads((unfused / "config.json").read_text())
    tensors = load_file(str(unfused / "model.safetensors"))
    fused = zoo.write_checkpoint(
        tmp_path / "fused",
        fuse_experts(tensors, config["num_local_experts"]),
        config,
        torch.float32,
    )
    shutil.copy(unfused / "tokenizer.json", fused / "tokenizer.json")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(fused / "model.safetensors"))
    cfg = ActivationsConfig(batch_size=2, seq_len=16, num_batches=2, seed=3)
    rows = {}
    with distributed("cpu") as ctx:
        for name, folder in (("unfused", unfused), ("fused", fused)):
            source = open_model(folder)
            result = run_activations(ctx, cfg, source.root, source)
            assert result is not None
            rows[name] = (result.rows, result.routing)
    assert rows["fused"] == rows["unfused"]


@pytest.mark.slow
def test_gguf_signatures_identical_for_1_and_2_ranks(llama: dict, tmp_path: Path) -> None:
    """4 KiB segments and read blocks spread a Q4_1 model over ranks: the signatures agree byte
    for byte, and with the default grid."""
    from test_fingerprint_job import torchrun  # its 4 KiB segments and read windows

    outs = []
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        r = torchrun(n, llama["q4"], out)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append((out / "signature.json").read_bytes())
    assert outs[0] == outs[1]
    rows = {r["name"]: r for r in json.loads(outs[0])["tensors"]}
    whole = fingerprint_rows({"q4": llama["q4"]}, tmp_path / "fp")["q4"]
    assert rows["blk.1.attn_q.weight"]["hash"] == whole[(1, "attn.q", None, "")]["hash"]
    assert (
        abs(rows["blk.1.attn_q.weight"]["std"] / whole[(1, "attn.q", None, "")]["std"] - 1) < 1e-12
    )


def test_a_fifo_named_gguf_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(CheckpointError, match="pipe.gguf"):
        open_model(tmp_path / "pipe.gguf")


def test_a_gguf_signature_streams_its_weights_from_the_file(llama: dict, tmp_path: Path) -> None:
    from npu_fp.compare.inputs import weights_of
    from npu_fp.signature import load_signature

    fingerprint_rows({"q8": llama["q8"]}, tmp_path)
    sig = load_signature(tmp_path / "q8" / "signature.json")
    assert sig.identity["path"] == str(llama["q8"])
    assert weights_of(sig) == (str(llama["q8"]), f"weights streamed from {llama['q8']}")


def test_mixtral_gguf_is_llama_with_experts(tmp_path: Path) -> None:
    """llama.cpp writes Mixtral as architecture llama with expert stacks (and permuted q/k)."""
    t, config = moe_tensors(seed=6)
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    hf = zoo.write_checkpoint(tmp_path / "hf", t, config, torch.float32, tok)
    gg = write_gguf(tmp_path / "mixtral.gguf", t, config, "llama", tokens=tokens_of(tok))
    source = open_model(gg)
    assert source.config["architectures"] == ["MixtralForCausalLM"]
    assert source.config["num_local_experts"] == 4
    rows = fingerprint_rows({"hf": hf, "g": gg}, tmp_path / "fp")
    assert_rows_agree(rows["g"], rows["hf"], 1e-12)
    view, ref = open_view(str(gg)), open_view(str(hf))
    assert view.rolemap.arch == "gguf_llama" and view.num_experts == 4
    assert torch.equal(view.read(1, "attn.k"), ref.read(1, "attn.k"))
    assert torch.equal(view.read(0, "moe.expert.gate", 2), ref.read(0, "moe.expert.gate", 2))
    view.close()
    ref.close()


def test_older_mixtral_gguf_with_one_tensor_per_expert_reads_like_the_stacked_one(
    tmp_path: Path,
) -> None:
    """`blk.N.ffn_gate.E.weight` (llama.cpp before `_exps` stacks) is expert E of layer N: the
    same names, roles and rows as the stacked file and the HF original."""
    t, config = moe_tensors(seed=7)
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    hf = zoo.write_checkpoint(tmp_path / "hf", t, config, torch.float32, tok)
    old = write_gguf(
        tmp_path / "old.gguf", t, config, "llama", tokens=tokens_of(tok), expert_stacks=False
    )
    new = write_gguf(tmp_path / "new.gguf", t, config, "llama", tokens=tokens_of(tok))
    stored = {x.name for x in gguf.GGUFReader(str(old)).tensors}
    assert "blk.0.ffn_gate.3.weight" in stored and not any("_exps" in n for n in stored)
    assert sorted(open_model(old).tensors) == sorted(open_model(new).tensors)
    rows = fingerprint_rows({"hf": hf, "old": old, "new": new}, tmp_path / "fp")
    assert_rows_agree(rows["old"], rows["hf"], 1e-12)
    assert_rows_agree(rows["old"], rows["new"], 0.0)
    view, ref = open_view(str(old)), open_view(str(hf))
    assert view.num_experts == 4 and not view.rolemap.unmapped
    for e in range(4):
        for role in ("moe.expert.gate", "moe.expert.up", "moe.expert.down"):
            assert torch.equal(view.read(1, role, e), ref.read(1, role, e)), (role, e)
    view.close()
    ref.close()


def test_plain_ggml_types_read_like_safetensors_dtypes(tmp_path: Path) -> None:
    """F64 and integer GGUF tensors take the plain path (no codec), widened like safetensors."""
    from npu_fp.io.reader import FileCache, RowReader

    rng = np.random.default_rng(1)
    arrays = {
        "blk.0.ffn_up.weight": rng.normal(size=(6, 32)),
        "blk.0.ffn_gate.weight": rng.integers(-9, 9, (6, 32)).astype(np.int32),
        "blk.0.ffn_down.weight": rng.integers(-9, 9, (32, 6)).astype(np.int8),
    }
    w = gguf.GGUFWriter(str(tmp_path / "p.gguf"), "qwen2")
    for key, value in (("block_count", 1), ("embedding_length", 32), ("attention.head_count", 1)):
        w.add_uint32(f"qwen2.{key}", value)
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = open_model(tmp_path / "p.gguf")
    with FileCache() as files:
        reader = RowReader(files)
        for name, a in arrays.items():
            ref = source.tensors[name]
            assert ref.codec is None and ref.dtype == {"float64": "F64"}.get(
                str(a.dtype), f"I{a.dtype.itemsize * 8}"
            )
            x = reader.widen(ref, reader.read(ref, 0, ref.rows), 0)
            assert np.array_equal(x.numpy(), a.astype(np.float64))
        reader.release()


def test_split_gguf_reads_all_its_shards(llama: dict, tmp_path: Path) -> None:
    tokens = tokens_of(zoo.tokenizer_json(SHAPE["vocab_size"]))
    config = json.loads((llama["hf"] / "config.json").read_text())
    write_gguf(tmp_path / "m.gguf", llama["tensors"], config, "llama", Q.Q8_0, tokens, 20)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 1 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
    source = open_model(shards[0])
    assert [f.name for f in source.files] == [p.name for p in shards]
    assert {Path(r.file).name for r in source.tensors.values()} == {p.name for p in shards}
    rows = fingerprint_rows({"split": shards[0], "one": llama["q8"]}, tmp_path / "fp")
    assert rows["split"].keys() == rows["one"].keys()
    for key, r in rows["split"].items():
        assert r["hash"] == rows["one"][key]["hash"] and r["std"] == rows["one"][key]["std"], key
    from npu_fp.compare.inputs import cache_key

    assert cache_key(str(shards[0]))[0] == str(shards[0])  # every shard's mtime in the key
    with pytest.raises(CheckpointError, match="pass the first of the"):
        open_model(shards[1])
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names a split of {len(shards)} GGUF shards"):
        open_model(shards[0])
