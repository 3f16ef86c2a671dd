"""Dense decoder families in (or close to) the Hugging Face Llama layout.

Llama / Mistral, Qwen2 / 2.5 (q/k/v biases), Qwen3 (q_norm / k_norm), Gemma 1/2/3 (RMSNorm gain
stored as w with 1 + w applied; sandwich norms from Gemma 2), openPangu-Embedded (`sandwich_norm`
decides what `post_attention_layernorm` means), Baichuan2 (`W_pack`), Phi-3 (`qkv_proj`,
`gate_up_proj`) and InternLM2 (grouped `wqkv`, its own names). The tables here are shared with
the MoE and DeepSeek adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_fp.arch.fused import gate_up_halves, qkv_contiguous, qkv_grouped
from npu_fp.arch.spec import Family, Rule

ATTN = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
}
QK_NORM = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
DENSE_MLP = {"mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}
# Pre-norm: post_attention_layernorm is the norm in front of the FFN.
PRE_NORM = {"input_layernorm": "norm.input", "post_attention_layernorm": "norm.post_attn"}
# Sandwich norm: post_attention_layernorm normalises the attention output instead.
GEMMA_SANDWICH = {
    "input_layernorm": "norm.input",
    "post_attention_layernorm": "norm.attn_out",
    "pre_feedforward_layernorm": "norm.post_attn",
    "post_feedforward_layernorm": "norm.mlp_out",
}
PANGU_SANDWICH = {
    "input_layernorm": "norm.input",
    "post_attention_layernorm": "norm.attn_out",
    "pre_mlp_layernorm": "norm.post_attn",
    "post_mlp_layernorm": "norm.mlp_out",
}
MLA = {
    "self_attn.q_a_proj": "attn.q_a",
    "self_attn.q_a_layernorm": "attn.q_a_norm",
    "self_attn.q_b_proj": "attn.q_b",
    "self_attn.q_proj": "attn.q",
    "self_attn.kv_a_proj_with_mqa": "attn.kv_a",
    "self_attn.kv_a_layernorm": "attn.kv_a_norm",
    "self_attn.kv_b_proj": "attn.kv_b",
    "self_attn.o_proj": "attn.o",
}
HF_GLOBALS = {"embed_tokens": "embed.tok", "norm": "norm.final", "lm_head": "head.lm"}
# MindFormers (MindSpore) names of the same Llama / Qwen2 modules, as its `.ckpt` files store
# them (layouts doc 3.18); the embedding's parameter is `embedding_weight` (see mapper.py)
MINDFORMERS_LAYER = {
    "attention.wq": "attn.q",
    "attention.wk": "attn.k",
    "attention.wv": "attn.v",
    "attention.wo": "attn.o",
    "attention.w_qkv": Rule("attn.qkv", split=qkv_contiguous(0)),
    "feed_forward.w1": "mlp.gate",
    "feed_forward.w3": "mlp.up",
    "feed_forward.w2": "mlp.down",
    "feed_forward.w_gate_hidden": Rule("mlp.gate_up", split=gate_up_halves),
    "attention_norm": "norm.input",
    "ffn_norm": "norm.post_attn",
}
MINDFORMERS_GLOBALS = {"tok_embeddings": "embed.tok", "norm_out": "norm.final"}
# MindFormers MoE layers: the router, the shared expert, and the routed experts, whose
# grouped-matmul stacks `routed_experts.ffn.w1/w2/w3` [E, in, out] io/expert_stacks.py cuts into
# `routed_experts.ffn.experts.{e}.w1` [in, out]: stored transposed (transpose_b=False)
MINDFORMERS_MOE_LAYER = {
    "feed_forward.routed_experts.router.dense": "moe.router",
    "feed_forward.shared_experts.w1": "moe.shared.gate",
    "feed_forward.shared_experts.w3": "moe.shared.up",
    "feed_forward.shared_experts.w2": "moe.shared.down",
}
MINDFORMERS_EXPERTS = {
    "w1": Rule("moe.expert.gate", transposed=True),
    "w3": Rule("moe.expert.up", transposed=True),
    "w2": Rule("moe.expert.down", transposed=True),
}
MINDFORMERS_EXPERT_CONTAINER = "feed_forward.routed_experts.ffn"


def sandwich_norm(config: Mapping[str, Any]) -> bool:
    return bool(config.get("sandwich_norm", False))


def is_mla(config: Mapping[str, Any]) -> bool:
    return config.get("kv_lora_rank") is not None


def llama(config: Mapping[str, Any]) -> Family:
    return Family(
        "llama",
        layer={**ATTN, **DENSE_MLP, **PRE_NORM, **MINDFORMERS_LAYER, **MINDFORMERS_MOE_LAYER},
        globals={**HF_GLOBALS, **MINDFORMERS_GLOBALS},
        experts=MINDFORMERS_EXPERTS,
        expert_containers=(MINDFORMERS_EXPERT_CONTAINER,),
    )


def qwen2(config: Mapping[str, Any]) -> Family:
    # Same tables as Llama; q/k/v biases map through the generic `.bias` rule.
    return Family(
        "qwen2",
        layer={**ATTN, **DENSE_MLP, **PRE_NORM, **MINDFORMERS_LAYER, **MINDFORMERS_MOE_LAYER},
        globals={**HF_GLOBALS, **MINDFORMERS_GLOBALS},
        experts=MINDFORMERS_EXPERTS,
        expert_containers=(MINDFORMERS_EXPERT_CONTAINER,),
    )


def qwen3(config: Mapping[str, Any]) -> Family:
    return Family("qwen3", layer={**ATTN, **QK_NORM, **DENSE_MLP, **PRE_NORM}, globals=HF_GLOBALS)


def gemma(config: Mapping[str, Any]) -> Family:
    return Family(
        "gemma", layer={**ATTN, **DENSE_MLP, **PRE_NORM}, globals=HF_GLOBALS, norm_offset=1.0
    )


def gemma2(config: Mapping[str, Any]) -> Family:
    return Family(
        "gemma2",
        layer={**ATTN, **DENSE_MLP, **GEMMA_SANDWICH},
        globals=HF_GLOBALS,
        norm_offset=1.0,
    )


def gemma3(config: Mapping[str, Any]) -> Family:
    return Family(
        "gemma3",
        layer={**ATTN, **QK_NORM, **DENSE_MLP, **GEMMA_SANDWICH},
        globals=HF_GLOBALS,
        norm_offset=1.0,
    )


def openpangu_dense(config: Mapping[str, Any]) -> Family:
    attn = MLA if is_mla(config) else ATTN
    norms = PANGU_SANDWICH if sandwich_norm(config) else PRE_NORM
    return Family("openpangu_dense", layer={**attn, **DENSE_MLP, **norms}, globals=HF_GLOBALS)


def baichuan(config: Mapping[str, Any]) -> Family:
    layer = {
        "self_attn.W_pack": Rule("attn.qkv", split=qkv_contiguous(0)),
        "self_attn.o_proj": "attn.o",
        **DENSE_MLP,
        **PRE_NORM,
    }
    return Family("baichuan", layer=layer, globals=HF_GLOBALS)


def phi3(config: Mapping[str, Any]) -> Family:
    layer = {
        "self_attn.qkv_proj": Rule("attn.qkv", split=qkv_contiguous(0)),
        "self_attn.o_proj": "attn.o",
        "mlp.gate_up_proj": Rule("mlp.gate_up", split=gate_up_halves),
        "mlp.down_proj": "mlp.down",
        **PRE_NORM,
    }
    return Family("phi3", layer=layer, globals=HF_GLOBALS)


def internlm2(config: Mapping[str, Any]) -> Family:
    layer = {
        "attention.wqkv": Rule("attn.qkv", split=qkv_grouped),
        "attention.wo": "attn.o",
        "attention_norm": "norm.input",
        "ffn_norm": "norm.post_attn",
        "feed_forward.w1": "mlp.gate",
        "feed_forward.w3": "mlp.up",
        "feed_forward.w2": "mlp.down",
    }
    globals_ = {"tok_embeddings": "embed.tok", "norm": "norm.final", "output": "head.lm"}
    return Family("internlm2", layer=layer, globals=globals_)
