"""Pangu Pro MoE (MoGE) decoder layer, written from the release's `modeling_pangu_moe.py`.

transformers has no Pangu Pro MoE, so the layer is assembled here: attention is transformers'
`LlamaAttention` with biases on q, k, v and o (`attention_bias=True`, head_dim = hidden / heads, as
in the release), RMSNorm pre-norm, and the Mixture-of-Grouped-Experts block routed exactly as the
release's `modeling_pangu_moe.py` routes:

- softmax over all router logits in fp32;
- the experts are split into `num_groups` contiguous groups and the top-1 inside each group is
  taken (`torch.max` over the group: ties go to the lower expert id), expert id = argmax + g * size;
- no renormalisation of the selected probabilities, no selection bias;
- each selected expert's output is multiplied by its probability (cast to the hidden dtype) and
  then by `router_scale[0, e]`;
- the shared expert is added without a gate.

The release hard-codes 8 groups and refuses anything but 64 experts / top-8; here the number of
groups is `num_experts_per_tok` (8 in the release, so identical there), which lets tiny test models
use fewer experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm

from npu_fp.arch.moe import pangu_group_size
from npu_fp.forward.errors import UnsupportedArchitectureError

# PanguProMoEConfig defaults of the release; config.json overrides every one of them
RELEASE_DEFAULTS: dict[str, object] = {
    "vocab_size": 153376,
    "hidden_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "moe_intermediate_size": 1344,
    "shared_expert_intermediate_size": 5376,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "rope_theta": 1.6e7,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}


def pangu_config(config: dict) -> LlamaConfig:
    """A LlamaConfig carrying the attention geometry plus the MoGE fields the block reads."""
    c = {k: config.get(k, v) for k, v in RELEASE_DEFAULTS.items()}
    if c["num_experts"] % c["num_experts_per_tok"]:
        raise UnsupportedArchitectureError(
            f"Pangu Pro MoE config: num_experts={c['num_experts']} is not a multiple of "
            f"num_experts_per_tok={c['num_experts_per_tok']} (one expert per group)"
        )
    # the expert groups are those of the fingerprint (npu_fp.arch decides them)
    groups = c["num_experts"] // pangu_group_size({**config, "num_experts": c["num_experts"]})
    if groups != c["num_experts_per_tok"]:
        raise UnsupportedArchitectureError(
            f"Pangu Pro MoE config: {groups} expert groups (num_groups / experts_per_group) differ "
            f"from num_experts_per_tok={c['num_experts_per_tok']}; MoGE routes exactly one expert "
            "per group"
        )
    hf = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["moe_intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        hidden_act=c["hidden_act"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        attention_bias=True,
        attention_dropout=0.0,
    )
    for key in (
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
    ):
        setattr(hf, key, c[key])
    return hf


class PanguMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PanguExperts(nn.Module):
    """Routed experts stacked as [E, 2I, H] (gate; up) and [E, H, I], the transformers 5 layout."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.act_fn = ACT2FN[act]

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        by_slot = top_k_index.t()  # [k, T]: the release's expert_mask[e] is slot-major
        for e in torch.unique(top_k_index).tolist():  # ascending, as the release's expert loop
            slot, tok = torch.where(by_slot == e)
            gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
            y = y * top_k_weights[tok, slot, None] * scale[:, e][0]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class PanguMoGEBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.num_groups = config.num_experts_per_tok
        h, act = config.hidden_size, config.hidden_act
        self.gate = nn.Linear(h, self.num_experts, bias=False)
        self.experts = PanguExperts(self.num_experts, h, config.moe_intermediate_size, act)
        self.shared_expert = PanguMLP(h, config.shared_expert_intermediate_size, act)
        self.router_scale = nn.Parameter(torch.ones(1, self.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, groups] in x's dtype, expert ids [T, groups]) for tokens x [T, H]."""
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, idx = torch.max(probs.view(x.shape[0], self.num_groups, -1), dim=-1)
        size = self.num_experts // self.num_groups
        offset = torch.arange(0, self.num_experts, size, device=x.device, dtype=torch.int64)
        return weights.to(x.dtype), idx + offset[None, :]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        weights, idx = self.route(x)
        out = self.experts(x, idx, weights, self.router_scale)
        out = out + self.shared_expert(x)
        return out.reshape(b, t, h)


class PanguProMoEDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = PanguMoGEBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(
            hidden_states=h,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        h = residual + h
        residual = h
        h = self.mlp(self.post_attention_layernorm(h))
        return residual + h
