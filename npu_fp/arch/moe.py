"""Mixture-of-experts families: Qwen1.5/2-MoE, Qwen3-MoE, Mixtral, Pangu Pro MoE (MoGE), and
DeepSeek-V2/V3 with the openPangu MoE models that reuse its layout (MLA, dense first layers,
shared experts, selection bias, MTP blocks past the last decoder layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_fp.arch.fused import expert_gate_up_halves
from npu_fp.arch.llama_like import (
    ATTN,
    DENSE_MLP,
    HF_GLOBALS,
    MLA,
    PANGU_SANDWICH,
    PRE_NORM,
    QK_NORM,
    is_mla,
    sandwich_norm,
)
from npu_fp.arch.mapper import num_experts_in
from npu_fp.arch.spec import Family, Rule, config_int

EXPERT_MLP = {
    "gate_proj": "moe.expert.gate",
    "up_proj": "moe.expert.up",
    "down_proj": "moe.expert.down",
    # one expert of a transformers-5 fused stack (io/expert_stacks.py)
    "gate_up_proj": Rule("moe.expert.gate_up", split=expert_gate_up_halves),
}
ROUTER = {"mlp.gate": "moe.router"}
SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj": "moe.shared.gate",
    "mlp.shared_expert.up_proj": "moe.shared.up",
    "mlp.shared_expert.down_proj": "moe.shared.down",
}
SHARED_EXPERTS = {  # DeepSeek spelling
    "mlp.shared_experts.gate_proj": "moe.shared.gate",
    "mlp.shared_experts.up_proj": "moe.shared.up",
    "mlp.shared_experts.down_proj": "moe.shared.down",
}
# Pangu Pro MoE release: num_groups = 8 (`check_config`), one expert chosen per group.
PANGU_DEFAULT_GROUPS = 8


def qwen2_moe(config: Mapping[str, Any]) -> Family:
    # Dense layers (mlp_only_layers / decoder_sparse_step) keep mlp.{gate,up,down}_proj.
    layer = {
        **ATTN,
        **PRE_NORM,
        **DENSE_MLP,
        **ROUTER,
        **SHARED_EXPERT,
        "mlp.shared_expert_gate": "moe.shared_gate",
    }
    return Family("qwen2_moe", layer=layer, globals=HF_GLOBALS, experts=EXPERT_MLP)


def qwen3_moe(config: Mapping[str, Any]) -> Family:
    layer = {**ATTN, **QK_NORM, **PRE_NORM, **DENSE_MLP, **ROUTER}
    return Family("qwen3_moe", layer=layer, globals=HF_GLOBALS, experts=EXPERT_MLP)


def mixtral(config: Mapping[str, Any]) -> Family:
    layer = {**ATTN, **PRE_NORM, "block_sparse_moe.gate": "moe.router", **ROUTER}
    # w1 gate, w2 down, w3 up: w2 is the down projection, not the up one.
    # transformers 5 stores Mixtral's experts fused, as `mlp.experts.{gate_up,down}_proj`
    experts = {
        "w1": "moe.expert.gate",
        "w2": "moe.expert.down",
        "w3": "moe.expert.up",
        **EXPERT_MLP,
    }
    return Family(
        "mixtral",
        layer=layer,
        globals=HF_GLOBALS,
        experts=experts,
        expert_containers=("block_sparse_moe", "mlp"),
    )


def pangu_group_size(config: Mapping[str, Any]) -> int:
    """Experts per MoGE group: `experts_per_group`, or num_experts / num_groups. Without either,
    the number of groups is `num_experts_per_tok` (MoGE routes one expert per group; 8 in the
    release), then 8."""
    num_experts = num_experts_in(config)
    direct = config_int(config, "experts_per_group")
    if direct is not None:
        if direct <= 0 or num_experts % direct:
            raise ValueError(
                f"config.json: experts_per_group={direct} must be positive and divide "
                f"num_experts={num_experts}"
            )
        return direct
    groups = config_int(config, "num_groups", "num_expert_groups", "n_group")
    if groups is None:
        groups = config_int(config, "num_experts_per_tok") or PANGU_DEFAULT_GROUPS
    if num_experts <= 0:
        raise ValueError("config.json: Pangu Pro MoE needs num_experts to derive expert groups")
    if groups <= 0 or num_experts % groups:
        raise ValueError(
            f"config.json: num_experts={num_experts} is not divisible into {groups} expert groups "
            "(num_groups); set num_groups or experts_per_group to the release's values"
        )
    return num_experts // groups


def pangu_pro_moe(config: Mapping[str, Any]) -> Family:
    # o_proj carries a bias here (unlike Qwen2); the generic `.bias` rule maps it to attn.o_bias.
    layer = {**ATTN, **PRE_NORM, **ROUTER, **SHARED_EXPERT}
    return Family(
        "pangu_pro_moe",
        layer=layer,
        globals=HF_GLOBALS,
        experts=EXPERT_MLP,
        params={"mlp.router_scale": "moe.router_scale"},
        experts_per_group=pangu_group_size(config),
    )


def deepseek_group_size(config: Mapping[str, Any]) -> int:
    """Experts per routing group of DeepSeek's group-limited routing (`n_group` groups of
    `n_routed_experts`); 0 without groups."""
    groups = config_int(config, "n_group") or 0
    num_experts = num_experts_in(config)
    if groups <= 1 or not num_experts:
        return 0
    if num_experts % groups:
        raise ValueError(
            f"config.json: n_routed_experts={num_experts} is not divisible into n_group={groups}"
        )
    return num_experts // groups


def deepseek(config: Mapping[str, Any]) -> Family:
    """DeepSeek-V2/V3, and openPangu V2 / Ultra MoE (DeepSeek names, optional sandwich norm)."""
    attn = MLA if is_mla(config) else ATTN
    norms = PANGU_SANDWICH if sandwich_norm(config) else PRE_NORM
    layer = {**attn, **norms, **DENSE_MLP, **ROUTER, **SHARED_EXPERTS}
    # openPangu stores the selection bias one level up; its loader renames it.
    params = {
        "mlp.gate.e_score_correction_bias": "moe.router_bias",
        "mlp.e_score_correction_bias": "moe.router_bias",
    }
    return Family(
        "deepseek",
        layer=layer,
        globals=HF_GLOBALS,
        experts=EXPERT_MLP,
        params=params,
        mtp=True,
        experts_per_group=deepseek_group_size(config),
    )
