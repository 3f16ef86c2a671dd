"""GPT-2 (HF `gpt2`, with or without the `transformer.` prefix).

Conv1D stores weights [in, out], so every projection is `transposed` and `c_attn` splits along
dim 1 (its bias [3H] along dim 0). `attn.bias` / `attn.masked_bias` are causal-mask buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_fp.arch.base import LAYER_PATTERNS
from npu_fp.arch.fused import qkv_contiguous
from npu_fp.arch.spec import Family, Rule


def gpt2(config: Mapping[str, Any]) -> Family:
    layer = {
        "ln_1": "norm.input",
        "ln_2": "norm.post_attn",
        "attn.c_attn": Rule("attn.qkv", transposed=True, split=qkv_contiguous(1)),
        "attn.c_proj": Rule("attn.o", transposed=True),
        "mlp.c_fc": Rule("mlp.up", transposed=True),
        "mlp.c_proj": Rule("mlp.down", transposed=True),
    }
    globals_ = {"wte": "embed.tok", "wpe": "embed.pos", "ln_f": "norm.final", "lm_head": "head.lm"}
    return Family(
        "gpt2",
        layer=layer,
        globals=globals_,
        layer_patterns=(LAYER_PATTERNS["h"],),
        layer_aux=frozenset({"attn.bias", "attn.masked_bias"}),
    )
