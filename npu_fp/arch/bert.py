"""BERT-family encoders (BERT, RoBERTa, XLM-R): post-norm, optional `bert.` / `roberta.` prefix.

Post-norm has no exact pre-norm analogue; by convention the LayerNorm after
attention, which feeds the FFN, is `norm.post_attn` and the one after the FFN is `norm.mlp_out`.
Task heads (`cls.*`, `lm_head.*`, `classifier.*`, `qa_outputs.*`) are not part of the encoder
profile and are kept as aux. Old TensorFlow ports name LayerNorm parameters gamma / beta; the
mapper reads those as weight / bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_fp.arch.base import LAYER_PATTERNS
from npu_fp.arch.spec import Family


def bert(config: Mapping[str, Any]) -> Family:
    layer = {
        "attention.self.query": "attn.q",
        "attention.self.key": "attn.k",
        "attention.self.value": "attn.v",
        "attention.output.dense": "attn.o",
        "attention.output.LayerNorm": "norm.post_attn",
        "intermediate.dense": "mlp.up",
        "output.dense": "mlp.down",
        "output.LayerNorm": "norm.mlp_out",
    }
    globals_ = {
        "embeddings.word_embeddings": "embed.tok",
        "embeddings.position_embeddings": "embed.pos",
        "embeddings.token_type_embeddings": "embed.type",
        "embeddings.LayerNorm": "embed.norm",
        "pooler.dense": "pooler",
    }
    return Family(
        "bert",
        layer=layer,
        globals=globals_,
        layer_patterns=(LAYER_PATTERNS["bert"],),
        global_aux=("cls", "lm_head", "classifier", "qa_outputs"),
    )
