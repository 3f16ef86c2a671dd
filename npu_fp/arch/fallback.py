"""Adapter for architectures no family module knows: common name patterns only.

Covers HF Llama-style, MLA, InternLM / Meta / MindFormers-style and BERT-style names, the usual MoE
containers and all three layer regexes. Fused tensors are recognised but not split (their layouts
differ per family: contiguous, grouped or interleaved), and GPT-2 Conv1D names are left unmapped
because their orientation cannot be told from the name. Whatever matches nothing is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from npu_fp.arch.base import LAYER_PATTERNS
from npu_fp.arch.bert import bert
from npu_fp.arch.llama_like import (
    ATTN,
    DENSE_MLP,
    GEMMA_SANDWICH,
    HF_GLOBALS,
    MLA,
    PANGU_SANDWICH,
    PRE_NORM,
    QK_NORM,
)
from npu_fp.arch.moe import EXPERT_MLP, ROUTER, SHARED_EXPERT, SHARED_EXPERTS
from npu_fp.arch.spec import Family

_FUSED = {
    "self_attn.qkv_proj": "attn.qkv",
    "self_attn.W_pack": "attn.qkv",
    "attention.wqkv": "attn.qkv",
    "attention.w_qkv": "attn.qkv",
    "self_attention.query_key_value": "attn.qkv",
    "mlp.gate_up_proj": "mlp.gate_up",
    "feed_forward.w_gate_hidden": "mlp.gate_up",
}
_META_STYLE = {
    "attention.wq": "attn.q",
    "attention.wk": "attn.k",
    "attention.wv": "attn.v",
    "attention.wo": "attn.o",
    "attention_norm": "norm.input",
    "ffn_norm": "norm.post_attn",
    "feed_forward.w1": "mlp.gate",
    "feed_forward.w3": "mlp.up",
    "feed_forward.w2": "mlp.down",
}
_GLOBALS = {
    **HF_GLOBALS,
    "tok_embeddings": "embed.tok",
    "wte": "embed.tok",
    "word_embeddings": "embed.tok",
    "ln_f": "norm.final",
    "final_layernorm": "norm.final",
    "norm_out": "norm.final",
    "output": "head.lm",
    "output_layer": "head.lm",
}
_SANDWICH_MARKERS = ("pre_feedforward_layernorm.", "pre_mlp_layernorm.")


def fallback(config: Mapping[str, Any], names: Iterable[str]) -> Family:
    names = list(names)
    arch = (config.get("architectures") or [None])[0] or config.get("model_type")
    warnings = [f"unknown architecture {arch!r}: tensors mapped by name patterns only"]
    sandwich = any(m in n for n in names for m in _SANDWICH_MARKERS)
    norms = {
        **PRE_NORM,
        **(GEMMA_SANDWICH if sandwich else {}),
        **(PANGU_SANDWICH if sandwich else {}),
    }
    if sandwich:
        warnings.append(
            "fallback: pre-FFN norm names found, so post_attention_layernorm is read as the "
            "attention-output norm (sandwich norm)"
        )
    fused = sorted({n for n in names for key in _FUSED if f".{key}." in f".{n}"})
    if fused:
        warnings.append(
            "fallback: fused tensors kept whole, not split into parts (layout unknown): "
            + ", ".join(fused)
        )
    enc = bert(config)
    layer = {
        **ATTN,
        **QK_NORM,
        **MLA,
        **DENSE_MLP,
        **norms,
        **_META_STYLE,
        **_FUSED,
        **enc.layer,
        **ROUTER,
        "block_sparse_moe.gate": "moe.router",
        **SHARED_EXPERT,
        **SHARED_EXPERTS,
        "mlp.shared_expert_gate": "moe.shared_gate",
    }
    experts = {
        **EXPERT_MLP,
        "w1": "moe.expert.gate",
        "w3": "moe.expert.up",
        "w2": "moe.expert.down",
    }
    params = {
        "mlp.gate.e_score_correction_bias": "moe.router_bias",
        "mlp.e_score_correction_bias": "moe.router_bias",
        "mlp.router_scale": "moe.router_scale",
    }
    return Family(
        "fallback",
        layer=layer,
        globals={**_GLOBALS, **enc.globals},
        experts=experts,
        expert_containers=("mlp", "block_sparse_moe", "feed_forward"),
        params=params,
        layer_patterns=tuple(LAYER_PATTERNS.values()),
        warnings=tuple(warnings),
    )
