"""GGUF tensor names (llama.cpp's `gguf-py/gguf/constants.py` TENSOR_NAMES) for the families read
from GGUF files: llama (and Mixtral, which GGUF files call llama), qwen2, qwen2moe, qwen3,
qwen3moe, gemma, gemma2, gemma3.

Layers are `blk.{L}.`; expert stacks `ffn_{gate,up,down}_exps` reach this module one expert at a
time as `blk.{L}.experts.{e}.ffn_{gate,up,down}` (io/expert_stacks.py). Gemma's folded `+1` has
been undone on read (io/gguf_codec.py), so Gemma gains keep the HF norm offset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from npu_fp.arch.spec import Family

GGUF_LAYER = re.compile(r"(?:^|\.)blk\.(\d+)\.")

ATTN = {"attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o"}
QK_NORM = {"attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
PRE_NORM = {"attn_norm": "norm.input", "ffn_norm": "norm.post_attn"}
# Gemma 2/3: llama.cpp's ATTN_POST_NORM / FFN_PRE_NORM / FFN_POST_NORM (layouts doc 3.17)
SANDWICH = {
    "attn_norm": "norm.input",
    "post_attention_norm": "norm.attn_out",
    "ffn_norm": "norm.post_attn",
    "post_ffw_norm": "norm.mlp_out",
}
DENSE_MLP = {"ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
ROUTER = {"ffn_gate_inp": "moe.router"}
SHARED = {
    "ffn_gate_shexp": "moe.shared.gate",
    "ffn_up_shexp": "moe.shared.up",
    "ffn_down_shexp": "moe.shared.down",
    "ffn_gate_inp_shexp": "moe.shared_gate",
}
EXPERTS = {"ffn_gate": "moe.expert.gate", "ffn_up": "moe.expert.up", "ffn_down": "moe.expert.down"}
GLOBALS = {"token_embd": "embed.tok", "output_norm": "norm.final", "output": "head.lm"}


def _family(name: str, layer: Mapping[str, str], norm_offset: float = 0.0) -> Family:
    moe = any(role.startswith("moe.") for role in layer.values())
    return Family(
        f"gguf_{name}",
        layer=layer,
        globals=GLOBALS,
        experts=EXPERTS if moe else {},
        expert_containers=("",),  # blk.{L}.experts.{e}. sits right under the block
        layer_aux=frozenset({"attn_rot_embd.weight"}),
        global_aux=("rope_freqs",),
        layer_patterns=(GGUF_LAYER,),
        norm_offset=norm_offset,
    )


def _llama(config: Mapping[str, Any]) -> Family:
    return _family("llama", {**ATTN, **PRE_NORM, **DENSE_MLP, **ROUTER})


def _qwen2(config: Mapping[str, Any]) -> Family:
    return _family("qwen2", {**ATTN, **PRE_NORM, **DENSE_MLP})


def _qwen2moe(config: Mapping[str, Any]) -> Family:
    return _family("qwen2moe", {**ATTN, **PRE_NORM, **DENSE_MLP, **ROUTER, **SHARED})


def _qwen3(config: Mapping[str, Any]) -> Family:
    return _family("qwen3", {**ATTN, **QK_NORM, **PRE_NORM, **DENSE_MLP})


def _qwen3moe(config: Mapping[str, Any]) -> Family:
    return _family("qwen3moe", {**ATTN, **QK_NORM, **PRE_NORM, **DENSE_MLP, **ROUTER})


def _gemma(config: Mapping[str, Any]) -> Family:
    return _family("gemma", {**ATTN, **PRE_NORM, **DENSE_MLP}, norm_offset=1.0)


def _gemma2(config: Mapping[str, Any]) -> Family:
    return _family("gemma2", {**ATTN, **SANDWICH, **DENSE_MLP}, norm_offset=1.0)


def _gemma3(config: Mapping[str, Any]) -> Family:
    return _family("gemma3", {**ATTN, **QK_NORM, **SANDWICH, **DENSE_MLP}, norm_offset=1.0)


# general.architecture of the file (config["gguf_architecture"], io/gguf_file.py) -> adapter
BY_GGUF_ARCHITECTURE: dict[str, Callable[[Mapping[str, Any]], Family]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen2moe": _qwen2moe,
    "qwen3": _qwen3,
    "qwen3moe": _qwen3moe,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
}
