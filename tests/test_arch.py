"""Architecture adapters (`npu_fp.arch.map_roles`) on tiny real checkpoints of every family."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import (
    FAMILIES,
    family_spec,
    make_tensors,
    part_view,
    write_checkpoint,
    write_family_checkpoint,
)
from safetensors import safe_open

from npu_fp.arch import PartSpec, RoleMap, adapter_name, map_roles


def read_checkpoint(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """config.json and name -> shape from the header, as the pipeline sees them."""
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


def load_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def layer_roles(rm: RoleMap, layer: int) -> Counter[str]:
    return Counter(r.role for r in rm.roles.values() if r.layer == layer and r.kind == "weight")


# ---- expected roles per layer, written out independently of the adapters -------------------

ATTN = ["attn.q", "attn.k", "attn.v", "attn.o"]
QKV_BIAS = ["attn.q_bias", "attn.k_bias", "attn.v_bias"]
PRE = ["norm.input", "norm.post_attn"]
SANDWICH = ["norm.input", "norm.attn_out", "norm.post_attn", "norm.mlp_out"]
MLP = ["mlp.gate", "mlp.up", "mlp.down"]
SHARED = ["moe.shared.gate", "moe.shared.up", "moe.shared.down"]
MLA_Q_LORA = [
    "attn.q_a",
    "attn.q_a_norm",
    "attn.q_b",
    "attn.kv_a",
    "attn.kv_a_norm",
    "attn.kv_b",
    "attn.o",
]
MLA_NO_LORA = ["attn.q", "attn.kv_a", "attn.kv_a_norm", "attn.kv_b", "attn.o"]
HF_GLOBAL = ["embed.tok", "norm.final", "head.lm"]


def experts(n: int) -> Counter[str]:
    return Counter({"moe.expert.gate": n, "moe.expert.up": n, "moe.expert.down": n})


def c(*lists: list[str], extra: Counter[str] | None = None) -> Callable[[int], Counter[str]]:
    roles = Counter(r for lst in lists for r in lst) + (extra or Counter())
    return lambda layer: roles


def first_dense(dense: Callable[[int], Counter[str]], moe: Callable[[int], Counter[str]]):
    return lambda layer: dense(layer) if layer == 0 else moe(layer)


LINEAR_BIASES = ["attn.o_bias", "mlp.up_bias", "mlp.down_bias"]
# family -> (adapter, per-layer roles, global roles, aux count, num_experts, experts_per_group)
EXPECTED: dict[str, tuple] = {
    "llama": ("llama", c(ATTN, PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "mistral": ("llama", c(ATTN, PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "qwen2": ("qwen2", c(ATTN, QKV_BIAS, PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "qwen2_moe": (
        "qwen2_moe",
        first_dense(
            c(ATTN, QKV_BIAS, PRE, MLP),
            c(ATTN, QKV_BIAS, PRE, ["moe.router", "moe.shared_gate"], SHARED, extra=experts(4)),
        ),
        HF_GLOBAL,
        0,
        4,
        0,
    ),
    "qwen3": ("qwen3", c(ATTN, ["attn.q_norm", "attn.k_norm"], PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "qwen3_moe": (
        "qwen3_moe",
        c(ATTN, ["attn.q_norm", "attn.k_norm"], PRE, ["moe.router"], extra=experts(4)),
        HF_GLOBAL,
        0,
        4,
        0,
    ),
    "mixtral": ("mixtral", c(ATTN, PRE, ["moe.router"], extra=experts(4)), HF_GLOBAL, 0, 4, 0),
    "deepseek_v2": (
        "deepseek",
        first_dense(
            c(MLA_NO_LORA, PRE, MLP), c(MLA_NO_LORA, PRE, ["moe.router"], SHARED, extra=experts(4))
        ),
        HF_GLOBAL,
        0,
        4,
        0,
    ),
    "deepseek_v3": (
        "deepseek",
        first_dense(
            c(MLA_Q_LORA, PRE, MLP),
            c(MLA_Q_LORA, PRE, ["moe.router", "moe.router_bias"], SHARED, extra=experts(4)),
        ),
        HF_GLOBAL,
        0,
        4,
        2,  # n_group=2: routing groups of 2 experts
    ),
    "deepseek_v3_fp8": (
        "deepseek",
        first_dense(
            c(MLA_Q_LORA, PRE, MLP),
            c(MLA_Q_LORA, PRE, ["moe.router", "moe.router_bias"], SHARED, extra=experts(4)),
        ),
        HF_GLOBAL,
        0,
        4,
        2,  # n_group=2: routing groups of 2 experts
    ),
    "pangu_pro_moe": (
        "pangu_pro_moe",
        c(
            ATTN,
            QKV_BIAS,
            ["attn.o_bias"],
            PRE,
            ["moe.router", "moe.router_scale"],
            SHARED,
            extra=experts(16),
        ),
        HF_GLOBAL,
        0,
        16,
        2,
    ),
    "openpangu_dense": (
        "openpangu_dense",
        c(ATTN, QKV_BIAS, ["attn.o_bias"], PRE, MLP),
        HF_GLOBAL,
        0,
        0,
        0,
    ),
    "openpangu_dense_sandwich": (
        "openpangu_dense",
        c(ATTN, QKV_BIAS, ["attn.o_bias"], SANDWICH, MLP),
        HF_GLOBAL,
        0,
        0,
        0,
    ),
    "baichuan2": ("baichuan", c(["attn.qkv", "attn.o"], PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "gpt2": (
        "gpt2",
        c(
            ["attn.qkv", "attn.qkv_bias", "attn.o", "mlp.up", "mlp.down"],
            LINEAR_BIASES,
            PRE,
            ["norm.input_bias", "norm.post_attn_bias"],
        ),
        ["embed.tok", "embed.pos", "norm.final", "norm.final_bias"],
        3,
        0,
        0,
    ),
    "bert": (
        "bert",
        c(
            ATTN,
            QKV_BIAS,
            LINEAR_BIASES,
            ["mlp.up", "mlp.down"],
            ["norm.post_attn", "norm.post_attn_bias", "norm.mlp_out", "norm.mlp_out_bias"],
        ),
        [
            "embed.tok",
            "embed.pos",
            "embed.type",
            "embed.norm",
            "embed.norm_bias",
            "pooler",
            "pooler_bias",
        ],
        8,
        0,
        0,
    ),
    "internlm2": ("internlm2", c(["attn.qkv", "attn.o"], PRE, MLP), HF_GLOBAL, 0, 0, 0),
    "phi3": ("phi3", c(["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"], PRE), HF_GLOBAL, 0, 0, 0),
    "gemma": ("gemma", c(ATTN, PRE, MLP), HF_GLOBAL[:2], 0, 0, 0),
    "gemma2": ("gemma2", c(ATTN, SANDWICH, MLP), HF_GLOBAL[:2], 0, 0, 0),
    "gemma3": (
        "gemma3",
        c(ATTN, ["attn.q_norm", "attn.k_norm"], SANDWICH, MLP),
        HF_GLOBAL[:2],
        0,
        0,
        0,
    ),
    "qwen2_vl": ("qwen2", c(ATTN, QKV_BIAS, PRE, MLP), HF_GLOBAL, 31, 0, 0),
    "qwen2_5_vl": ("qwen2", c(ATTN, QKV_BIAS, PRE, MLP), HF_GLOBAL, 30, 0, 0),
}


def test_expectations_cover_every_family() -> None:
    assert sorted(EXPECTED) == sorted(FAMILIES)
    assert len(FAMILIES) == 23


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: write_family_checkpoint(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_maps_cleanly(family: str, written: dict[str, Path]) -> None:
    config, shapes = read_checkpoint(written[family])
    rm = map_roles(config, shapes)
    arch, per_layer, global_roles, n_aux, n_experts, epg = EXPECTED[family]
    assert rm.arch == arch == adapter_name(config)
    assert rm.unmapped == () and rm.warnings == ()
    assert set(rm.roles) == set(shapes)
    assert rm.num_layers == 3
    assert (rm.num_experts, rm.experts_per_group) == (n_experts, epg)
    for layer in range(rm.num_layers):
        assert layer_roles(rm, layer) == per_layer(layer), f"{family} layer {layer}"
    top = Counter(r.role for r in rm.roles.values() if r.layer is None and r.kind == "weight")
    assert top == Counter(global_roles)
    assert sum(r.kind == "aux" for r in rm.roles.values()) == n_aux
    for r in rm.roles.values():
        assert (r.expert is not None) == r.role.startswith("moe.expert") or r.kind != "weight"
        assert r.layer is None or r.layer < rm.num_layers or r.kind in ("mtp", "scale")


# ---- fused tensors: parts filled with distinguishable constants ------------------------------


def _fused_case(family: str, name: str, tensor: torch.Tensor, tmp_path: Path):
    config, shapes = family_spec(family)
    tensors = make_tensors(config, shapes)
    assert tensors[name].shape == tensor.shape, "test builds the fused tensor at the real shape"
    tensors[name] = tensor
    path = write_checkpoint(config, tensors, tmp_path / family)
    config, shapes = read_checkpoint(path)
    return map_roles(config, shapes).roles[name], load_tensor(path, name)


def _assert_parts(parts: tuple[PartSpec, ...], t: torch.Tensor, expected: dict[str, tuple]):
    """expected: part -> (role, constant, element count)."""
    assert [p.part for p in parts] == list(expected)
    total = 0
    for p in parts:
        role, value, count = expected[p.part]
        view = part_view(t, p)
        assert p.role == role
        assert view.numel() == count, p
        assert torch.all(view == value), f"part {p.part} mixes values {view.unique().tolist()}"
        total += view.numel()
    assert total == t.numel()


def test_internlm2_grouped_wqkv_split(tmp_path: Path) -> None:
    nkv, per_kv, d, h = 2, 2, 8, 32  # 4 heads, 2 KV heads, head_dim 8
    grouped = torch.empty(nkv, per_kv + 2, d, h)
    grouped[:, :per_kv], grouped[:, -2], grouped[:, -1] = 1.0, 2.0, 3.0
    name = "model.layers.1.attention.wqkv.weight"
    role, t = _fused_case("internlm2", name, grouped.reshape(-1, h), tmp_path)
    assert role.role == "attn.qkv"
    _assert_parts(
        role.parts,
        t,
        {
            "q": ("attn.q", 1.0, 4 * d * h),
            "k": ("attn.k", 2.0, 2 * d * h),
            "v": ("attn.v", 3.0, 2 * d * h),
        },
    )
    assert len(role.parts[0].ranges) == nkv  # q is one row range per KV group
    # The trap: a contiguous split would call rows 16..32 "q", but they hold k and v of group 0.
    assert set(t[16:32].unique().tolist()) == {2.0, 3.0}


def test_phi3_qkv_and_gate_up_split(tmp_path: Path) -> None:
    q, kv, h, inter = 32, 16, 32, 64
    qkv = torch.cat([torch.full((q, h), 1.0), torch.full((kv, h), 2.0), torch.full((kv, h), 3.0)])
    role, t = _fused_case("phi3", "model.layers.2.self_attn.qkv_proj.weight", qkv, tmp_path)
    _assert_parts(
        role.parts,
        t,
        {"q": ("attn.q", 1.0, q * h), "k": ("attn.k", 2.0, kv * h), "v": ("attn.v", 3.0, kv * h)},
    )
    gate_up = torch.cat([torch.full((inter, h), 4.0), torch.full((inter, h), 5.0)])
    role, t = _fused_case(
        "phi3", "model.layers.0.mlp.gate_up_proj.weight", gate_up, tmp_path / "gu"
    )
    assert role.role == "mlp.gate_up"
    _assert_parts(
        role.parts, t, {"gate": ("mlp.gate", 4.0, inter * h), "up": ("mlp.up", 5.0, inter * h)}
    )


def test_baichuan_w_pack_split(tmp_path: Path) -> None:
    h = 32
    w = torch.cat([torch.full((h, h), float(i)) for i in (1, 2, 3)])
    role, t = _fused_case("baichuan2", "model.layers.0.self_attn.W_pack.weight", w, tmp_path)
    _assert_parts(
        role.parts,
        t,
        {"q": ("attn.q", 1.0, h * h), "k": ("attn.k", 2.0, h * h), "v": ("attn.v", 3.0, h * h)},
    )


def test_gpt2_c_attn_splits_columns(tmp_path: Path) -> None:
    h = 32
    w = torch.cat([torch.full((h, h), float(i)) for i in (1, 2, 3)], dim=1)  # Conv1D [H, 3H]
    role, t = _fused_case("gpt2", "h.1.attn.c_attn.weight", w, tmp_path)
    assert role.transposed and all(p.dim == 1 for p in role.parts)
    _assert_parts(
        role.parts,
        t,
        {"q": ("attn.q", 1.0, h * h), "k": ("attn.k", 2.0, h * h), "v": ("attn.v", 3.0, h * h)},
    )
    b = torch.cat([torch.full((h,), float(i)) for i in (1, 2, 3)])
    role, t = _fused_case("gpt2", "h.1.attn.c_attn.bias", b, tmp_path / "bias")
    assert role.role == "attn.qkv_bias" and not role.transposed
    _assert_parts(
        role.parts,
        t,
        {"q": ("attn.q_bias", 1.0, h), "k": ("attn.k_bias", 2.0, h), "v": ("attn.v_bias", 3.0, h)},
    )


def test_gpt2_orientation_and_buffers() -> None:
    config, shapes = family_spec("gpt2")
    shapes["h.0.attn.masked_bias"] = ()
    rm = map_roles(config, shapes)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert rm.roles[f"h.2.{m}.weight"].transposed
        assert not rm.roles[f"h.2.{m}.bias"].transposed
    assert not rm.roles["h.2.ln_1.weight"].transposed
    for n in ("h.0.attn.bias", "h.0.attn.masked_bias"):
        assert (rm.roles[n].kind, rm.roles[n].role, rm.roles[n].layer) == ("aux", "aux", 0)
    # distilgpt2-style `transformer.` prefix maps the same way
    prefixed = map_roles(config, {f"transformer.{k}": v for k, v in shapes.items()})
    assert prefixed.unmapped == ()
    assert prefixed.roles["transformer.h.1.mlp.c_fc.weight"].role == "mlp.up"


@pytest.mark.parametrize(
    ("family", "override", "name"),
    [
        ("phi3", {"num_key_value_heads": 4}, "model.layers.0.self_attn.qkv_proj.weight"),
        ("phi3", {"intermediate_size": 48}, "model.layers.0.mlp.gate_up_proj.weight"),
        ("internlm2", {"head_dim": 4}, "model.layers.0.attention.wqkv.weight"),
        (
            "baichuan2",
            {"num_attention_heads": 2, "head_dim": 8},
            "model.layers.0.self_attn.W_pack.weight",
        ),
        ("gpt2", {"n_head": 4, "head_dim": 4}, "h.0.attn.c_attn.weight"),
    ],
)
def test_fused_shape_mismatch_raises(family: str, override: dict, name: str) -> None:
    config, shapes = family_spec(family)
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        map_roles({**config, **override}, shapes)
    assert str(list(shapes[name])) in str(err.value) and "expected" in str(err.value)


def test_internlm2_heads_not_multiple_of_kv_heads() -> None:
    config, shapes = family_spec("internlm2")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        map_roles({**config, "num_attention_heads": 5, "head_dim": 8}, shapes)


# ---- indices ---------------------------------------------------------------------------------


def test_layer_indices_above_nine(tmp_path: Path) -> None:
    config, shapes = family_spec("llama", num_hidden_layers=12)
    path = write_checkpoint(config, make_tensors(config, shapes), tmp_path)
    config, shapes = read_checkpoint(path)
    names = list(shapes)
    assert names.index("model.layers.10.mlp.up_proj.weight") < names.index(
        "model.layers.2.mlp.up_proj.weight"
    ), "header order is lexicographic"
    rm = map_roles(config, shapes)
    assert rm.num_layers == 12 and rm.unmapped == ()
    for layer in range(12):
        assert layer_roles(rm, layer) == Counter(ATTN + PRE + MLP)
    assert rm.roles["model.layers.11.self_attn.k_proj.weight"].layer == 11


def test_moe_expert_and_group_indices(written: dict[str, Path]) -> None:
    config, shapes = read_checkpoint(written["pangu_pro_moe"])
    rm = map_roles(config, shapes)
    assert rm.experts_per_group == 16 // 8
    seen = set()
    for r in rm.roles.values():
        if r.expert is not None:
            assert r.group == r.expert // rm.experts_per_group
            assert f".layers.{r.layer}.mlp.experts.{r.expert}." in r.name
            seen.add((r.layer, r.expert))
        else:
            assert r.group is None
    assert seen == {(layer, e) for layer in range(3) for e in range(16)}
    r = rm.roles["model.layers.1.mlp.experts.13.down_proj.weight"]
    assert (r.role, r.layer, r.expert, r.group) == ("moe.expert.down", 1, 13, 6)
    assert rm.roles["model.layers.2.mlp.router_scale"].role == "moe.router_scale"
    assert rm.roles["model.layers.2.self_attn.o_proj.bias"].role == "attn.o_bias"


@pytest.mark.parametrize(
    ("override", "epg"), [({"num_groups": 4}, 4), ({"experts_per_group": 8}, 8)]
)
def test_pangu_group_size_from_config(override: dict, epg: int) -> None:
    config, shapes = family_spec("pangu_pro_moe")
    rm = map_roles({**config, **override}, shapes)
    assert rm.experts_per_group == epg
    assert rm.roles["model.layers.0.mlp.experts.13.up_proj.weight"].group == 13 // epg


def test_pangu_bad_group_count_raises() -> None:
    config, shapes = family_spec("pangu_pro_moe")
    with pytest.raises(ValueError, match="num_groups"):
        map_roles({**config, "num_groups": 3}, shapes)


def test_mixtral_w2_is_down() -> None:
    rm = map_roles(*family_spec("mixtral"))
    w = {
        k: rm.roles[f"model.layers.2.block_sparse_moe.experts.3.{k}.weight"]
        for k in ("w1", "w2", "w3")
    }
    assert [w[k].role for k in ("w1", "w2", "w3")] == [
        "moe.expert.gate",
        "moe.expert.down",
        "moe.expert.up",
    ]
    assert {(r.layer, r.expert) for r in w.values()} == {(2, 3)}


def test_expert_index_beyond_config_raises() -> None:
    config, shapes = family_spec("qwen3_moe")
    shapes["model.layers.0.mlp.experts.4.up_proj.weight"] = (16, 32)
    with pytest.raises(ValueError, match="expert index 4"):
        map_roles(config, shapes)


def test_deepseek_mtp_scales_and_selection_bias(written: dict[str, Path]) -> None:
    config, shapes = read_checkpoint(written["deepseek_v3_fp8"])
    rm = map_roles(config, shapes)
    assert rm.num_layers == config["num_hidden_layers"] == 3
    mtp = [r for r in rm.roles.values() if r.kind == "mtp"]
    assert mtp and all(r.role == "mtp" and r.layer == 3 for r in mtp)
    assert rm.roles["model.layers.3.mlp.experts.1.up_proj.weight"].expert == 1
    scale = rm.roles["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert (scale.kind, scale.role, scale.layer) == ("scale", "aux", 1)
    scale = rm.roles["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"]
    assert (scale.kind, scale.layer, scale.expert) == ("scale", 2, 3)
    assert rm.roles["model.layers.3.eh_proj.weight_scale_inv"].kind == "scale"
    assert rm.roles["model.layers.1.mlp.gate.e_score_correction_bias"].role == "moe.router_bias"
    assert rm.roles["model.layers.0.mlp.gate_proj.weight"].role == "mlp.gate"  # dense layer
    assert (
        load_tensor(written["deepseek_v3_fp8"], "model.layers.1.mlp.experts.0.up_proj.weight").dtype
        == torch.float8_e4m3fn
    )


def test_openpangu_moe_selection_bias_name() -> None:
    config, shapes = family_spec("deepseek_v3")
    moved = {
        k.replace("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"): v
        for k, v in shapes.items()
    }
    rm = map_roles(
        {**config, "architectures": ["PanguUltraMoEForCausalLM"], "model_type": "pangu_ultra_moe"},
        moved,
    )
    assert rm.unmapped == ()
    assert rm.roles["model.layers.2.mlp.e_score_correction_bias"].role == "moe.router_bias"


def test_layer_beyond_config_raises_without_mtp() -> None:
    config, shapes = family_spec("llama")
    with pytest.raises(ValueError, match="layer index 2 >= num_hidden_layers=2"):
        map_roles({**config, "num_hidden_layers": 2}, shapes)


def test_missing_layer_warns() -> None:
    config, shapes = family_spec("llama")
    shapes = {k: v for k, v in shapes.items() if ".layers.1." not in k}
    rm = map_roles(config, shapes)
    assert rm.num_layers == 3 and any("[1]" in w for w in rm.warnings)


# ---- norms -----------------------------------------------------------------------------------


def test_norm_semantics_follow_config() -> None:
    plain = map_roles(*family_spec("openpangu_dense"))
    sandwich = map_roles(*family_spec("openpangu_dense_sandwich"))
    name = "model.layers.1.post_attention_layernorm.weight"
    assert (plain.roles[name].role, sandwich.roles[name].role) == (
        "norm.post_attn",
        "norm.attn_out",
    )
    assert sandwich.roles["model.layers.1.pre_mlp_layernorm.weight"].role == "norm.post_attn"
    assert sandwich.roles["model.layers.1.post_mlp_layernorm.weight"].role == "norm.mlp_out"
    # openPangu without sandwich_norm has no pre_mlp_layernorm: reported, not guessed
    config, shapes = family_spec("openpangu_dense_sandwich")
    rm = map_roles({**config, "sandwich_norm": False}, shapes)
    assert len(rm.unmapped) == 6 and all("mlp_layernorm" in n for n in rm.unmapped)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_norm_offset(family: str) -> None:
    rm = map_roles(*family_spec(family))
    norms = [r for r in rm.roles.values() if "norm" in r.name]
    assert norms and all(r.norm_offset == 1.0 for r in norms)
    assert all(r.norm_offset == 0.0 for r in rm.roles.values() if "norm" not in r.name)
    assert "lm_head.weight" not in rm.roles and rm.warnings == ()  # tied: nothing to report
    llama = map_roles(*family_spec("llama"))
    assert all(r.norm_offset == 0.0 for r in llama.roles.values())


def test_bert_old_names_and_no_prefix() -> None:
    config, shapes = family_spec("bert")
    old = {
        k.removeprefix("bert.")
        .replace("LayerNorm.weight", "LayerNorm.gamma")
        .replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in shapes.items()
    }
    rm = map_roles(config, old)
    assert rm.unmapped == ()
    assert rm.roles["encoder.layer.2.attention.output.LayerNorm.gamma"].role == "norm.post_attn"
    assert rm.roles["encoder.layer.2.output.LayerNorm.beta"].role == "norm.mlp_out_bias"
    assert rm.roles["embeddings.LayerNorm.gamma"].role == "embed.norm"
    assert rm.roles["embeddings.position_ids"].kind == "aux"
    assert rm.roles["cls.predictions.transform.LayerNorm.gamma"].kind == "aux"


# ---- unknown names ---------------------------------------------------------------------------


def test_unknown_architecture_falls_back_and_lists_unmapped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, shapes = family_spec("llama")
    config = {**config, "architectures": ["MysteryForCausalLM"], "model_type": "mystery"}
    odd = ["model.layers.2.adapter.lora_A.weight", "model.extra_table.weight"]
    shapes |= {odd[0]: (4, 32), odd[1]: (7, 32)}
    with caplog.at_level(logging.WARNING, logger="npu_fp.arch"):
        rm = map_roles(config, shapes)
    assert rm.arch == "fallback" == adapter_name(config)
    assert sorted(rm.unmapped) == sorted(odd)
    assert any("MysteryForCausalLM" in w for w in rm.warnings)
    listing = next(w for w in rm.warnings if "matched no rule" in w)
    assert all(n in listing for n in odd) and all(n in caplog.text for n in odd)
    assert (rm.roles[odd[0]].role, rm.roles[odd[0]].layer) == ("other", 2)
    assert (rm.roles[odd[1]].role, rm.roles[odd[1]].layer) == ("other", None)
    for layer in range(3):  # the Llama-style names themselves are understood
        assert layer_roles(rm, layer) == Counter(ATTN + PRE + MLP) + (
            Counter({"other": 1}) if layer == 2 else Counter()
        )


def test_fallback_keeps_fused_whole_and_says_so() -> None:
    config, shapes = family_spec("internlm2")
    rm = map_roles({**config, "architectures": ["SomeLM"], "model_type": "some"}, shapes)
    assert rm.unmapped == ()
    r = rm.roles["model.layers.0.attention.wqkv.weight"]
    assert r.role == "attn.qkv" and r.parts == ()
    assert any("not split" in w and r.name in w for w in rm.warnings)


def test_known_architecture_reports_unmatched(caplog: pytest.LogCaptureFixture) -> None:
    config, shapes = family_spec("qwen2")
    extra = "model.layers.1.self_attn.q_norm.weight"
    with caplog.at_level(logging.WARNING, logger="npu_fp.arch"):
        rm = map_roles(config, shapes | {extra: (8,)})
    assert rm.unmapped == (extra,)
    assert (rm.roles[extra].role, rm.roles[extra].layer) == ("other", 1)
    assert extra in caplog.text and any(extra in w for w in rm.warnings)


def test_model_type_selects_adapter_without_architectures() -> None:
    config, shapes = family_spec("qwen3")
    config.pop("architectures")
    assert map_roles(config, shapes).arch == "qwen3"


# ---- multimodal scoping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "tower", "count"), [("qwen2_vl", "visual.", 31), ("qwen2_5_vl", "model.visual.", 30)]
)
def test_vl_towers_are_aux(family: str, tower: str, count: int, written: dict[str, Path]) -> None:
    config, shapes = read_checkpoint(written[family])
    rm = map_roles(config, shapes)
    towers = [r for n, r in rm.roles.items() if n.startswith(tower)]
    assert len(towers) == count
    assert all(r.kind == "aux" and r.role == "aux" and r.layer is None for r in towers)
    assert rm.roles["lm_head.weight"].role == "head.lm"


def test_lm_prefix_override() -> None:
    config, shapes = family_spec("qwen2_5_vl")
    rm = map_roles(config, shapes, lm_prefix="model.language_model.")
    assert rm.roles["model.language_model.layers.2.self_attn.q_proj.bias"].role == "attn.q_bias"
    assert rm.roles["lm_head.weight"].kind == "aux"  # outside the given prefix
    assert rm.roles["model.visual.blocks.0.mlp.gate_proj.weight"].kind == "aux"


def test_llava_style_prefix_with_colliding_tower_layers() -> None:
    text, shapes = family_spec("llama")
    lm = {"language_model." + k: v for k, v in shapes.items()}
    tower = {
        f"vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj.weight": (16, 16)
        for i in range(5)
    }  # a second `layers.N` stack, deeper than the LM
    projector = {"multi_modal_projector.linear_1.weight": (32, 16)}
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
    }
    rm = map_roles(config, lm | tower | projector)
    assert rm.arch == "llama" and rm.num_layers == 3 and rm.unmapped == ()
    assert all(rm.roles[n].kind == "aux" and rm.roles[n].layer is None for n in tower | projector)
    r = rm.roles["language_model.model.layers.1.self_attn.q_proj.weight"]
    assert (r.role, r.layer) == ("attn.q", 1)
    assert rm.roles["language_model.lm_head.weight"].role == "head.lm"


# ---- cross-check against transformers --------------------------------------------------------

# family -> (auto class, on-disk name of our tensor in transformers' save, skip our tensor?)
# transformers >= 5 fuses MoE experts in memory (state_dict() shows `mlp.experts.gate_up_proj`)
# but save_pretrained writes the per-expert layout real checkpoints have, so the comparison is
# against what save_pretrained writes. Exceptions, all checkpoint content transformers does not
# model: GPT-2 mask buffers `attn.bias` and the hub's unprefixed names (transformers saves
# `transformer.`); BERT's `position_ids` buffer; DeepSeek-V3's MTP layer; and Qwen2.5-VL, which
# transformers 5 saves in the legacy `model.` / `visual.` layout.
_CAUSAL, _PRETRAIN, _VL = (
    "AutoModelForCausalLM",
    "AutoModelForPreTraining",
    "AutoModelForImageTextToText",
)
CROSS_CHECK: dict[str, tuple[str, Callable[[str], str], Callable[[str], bool]]] = {
    f: (_CAUSAL, lambda n: n, lambda n: False)
    for f in (
        "llama",
        "mistral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "mixtral",
        "deepseek_v2",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3",
    )
} | {
    "deepseek_v3": (_CAUSAL, lambda n: n, lambda n: ".layers.3." in n),
    "gpt2": (_CAUSAL, lambda n: "transformer." + n, lambda n: n.endswith(".attn.bias")),
    "bert": (_PRETRAIN, lambda n: n, lambda n: n.endswith("position_ids")),
    "qwen2_vl": (_VL, lambda n: n, lambda n: False),
    "qwen2_5_vl": (
        _VL,
        lambda n: n.replace("model.language_model.", "model.").replace("model.visual.", "visual."),
        lambda n: False,
    ),
}


@pytest.mark.parametrize("family", sorted(CROSS_CHECK))
def test_tiny_layout_matches_transformers(family: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    auto, rename, skip = CROSS_CHECK[family]
    config, shapes = family_spec(family)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    model = getattr(transformers, auto).from_config(hf_config)
    assert type(model).__name__ == config["architectures"][0]
    model.save_pretrained(tmp_path)
    _, saved = read_checkpoint(tmp_path)
    ours = {rename(n): s for n, s in shapes.items() if not skip(n)}
    assert sorted(ours) == sorted(saved)
    assert {n: s for n, s in ours.items() if saved[n] != s} == {}


def test_expert_groups_follow_routing_when_the_config_names_no_groups() -> None:
    """One rule for fingerprint and forward: MoGE routes one expert per group, so without
    num_groups / experts_per_group the groups are num_experts_per_tok (8 in the release)."""
    config, shapes = family_spec("pangu_pro_moe")
    bare = {k: v for k, v in config.items() if k not in ("num_groups", "experts_per_group")}
    assert map_roles({**bare, "num_experts_per_tok": 4}, shapes).experts_per_group == 16 // 4
    assert map_roles({**bare, "num_experts_per_tok": None}, shapes).experts_per_group == 16 // 8
    config, shapes = family_spec("deepseek_v3")
    assert map_roles({**config, "n_group": 1}, shapes).experts_per_group == 0
    with pytest.raises(ValueError, match="n_group=3"):
        map_roles({**config, "n_group": 3}, shapes)
