"""Architecture adapters: the "map roles" stage of the pipeline.

`map_roles(config, shapes)` turns every tensor name of a checkpoint into a `TensorRole` (layer, role,
expert, group, fused parts), picking the family adapter from config.json's `architectures[0]`, then
its `model_type`, then a multimodal `text_config`, and falling back to name patterns with a warning.
Models read from GGUF files carry `gguf_architecture` and get the GGUF-name adapters (gguf.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from npu_fp.arch.base import ROLES, PartSpec, RoleMap, TensorRole
from npu_fp.arch.bert import bert
from npu_fp.arch.fallback import fallback
from npu_fp.arch.gguf import BY_GGUF_ARCHITECTURE
from npu_fp.arch.gpt2 import gpt2
from npu_fp.arch.llama_like import (
    baichuan,
    gemma,
    gemma2,
    gemma3,
    internlm2,
    llama,
    openpangu_dense,
    phi3,
    qwen2,
    qwen3,
)
from npu_fp.arch.mapper import map_family
from npu_fp.arch.moe import deepseek, mixtral, pangu_pro_moe, qwen2_moe, qwen3_moe
from npu_fp.arch.spec import Family, merged_config

__all__ = ["ROLES", "PartSpec", "RoleMap", "TensorRole", "adapter_name", "map_roles"]

Builder = Callable[[Mapping[str, Any]], Family]

BY_ARCHITECTURE: dict[str, Builder] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": qwen2,
    "Qwen2VLForConditionalGeneration": qwen2,
    "Qwen2_5_VLForConditionalGeneration": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "Qwen3VLForConditionalGeneration": qwen3,
    "Qwen2MoeForCausalLM": qwen2_moe,
    "Qwen3MoeForCausalLM": qwen3_moe,
    "MixtralForCausalLM": mixtral,
    "DeepseekV2ForCausalLM": deepseek,
    "DeepseekV3ForCausalLM": deepseek,
    "PanguProMoEV2ForCausalLM": deepseek,
    "PanguUltraMoEForCausalLM": deepseek,
    "PanguProMoEForCausalLM": pangu_pro_moe,
    "PanguEmbeddedForCausalLM": openpangu_dense,
    "BaichuanForCausalLM": baichuan,
    "GPT2LMHeadModel": gpt2,
    "GPT2Model": gpt2,
    "InternLM2ForCausalLM": internlm2,
    "Phi3ForCausalLM": phi3,
    "GemmaForCausalLM": gemma,
    "Gemma2ForCausalLM": gemma2,
    "Gemma3ForCausalLM": gemma3,
    "Gemma3ForConditionalGeneration": gemma3,
}
# Used when architectures[0] is unknown (task heads such as BertForMaskedLM, or no architectures).
BY_MODEL_TYPE: dict[str, Builder] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen2_vl": qwen2,
    "qwen2_5_vl": qwen2,
    "qwen3": qwen3,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "mixtral": mixtral,
    "deepseek_v2": deepseek,
    "deepseek_v3": deepseek,
    "pangu_ultra_moe": deepseek,
    "PanguProMoE": pangu_pro_moe,
    "PanguEmbedded": openpangu_dense,
    "baichuan": baichuan,
    "gpt2": gpt2,
    "bert": bert,
    "roberta": bert,
    "xlm-roberta": bert,
    "camembert": bert,
    "internlm2": internlm2,
    "phi3": phi3,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "gemma3_text": gemma3,
}


def _builder(config: Mapping[str, Any]) -> Builder | None:
    gguf_arch = config.get("gguf_architecture")  # set by io/gguf_file.py: GGUF tensor names
    if isinstance(gguf_arch, str):
        return BY_GGUF_ARCHITECTURE.get(gguf_arch)
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, Mapping) else {}):
        archs = cfg.get("architectures") or []
        if archs and archs[0] in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[archs[0]]
        if cfg.get("model_type") in BY_MODEL_TYPE:
            return BY_MODEL_TYPE[cfg["model_type"]]
    return None


def adapter_name(config: Mapping[str, Any]) -> str:
    """The adapter `map_roles` would use for this config ("fallback" when none matches)."""
    build = _builder(config)
    return build(merged_config(config)).name if build else "fallback"


def map_roles(
    config: dict, shapes: dict[str, tuple[int, ...]], lm_prefix: str | None = None
) -> RoleMap:
    """Map every tensor in `shapes` (name -> shape) to its role.

    `config` is the parsed config.json. `lm_prefix`, when given, is the name prefix of the
    language model: only names starting with it get layer roles, all others become aux (otherwise
    the prefix is detected; vision and audio towers become aux). Raises ValueError when a fused
    tensor's shape does not match config.json or a layer / expert index lies outside it.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be the parsed config.json (a dict), got {type(config)}")
    merged = merged_config(config)
    build = _builder(config)
    family = build(merged) if build else fallback(merged, shapes)
    return map_family(family, merged, shapes, lm_prefix)
