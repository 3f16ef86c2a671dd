"""What a family adapter is made of: config dimensions, per-name rules and the `Family` record.

A family is data, not code: tables from module paths (the part of a tensor name before `.weight` /
`.bias`) to canonical roles. `mapper.py` walks a checkpoint's names through those tables. Fused
tensors carry a splitter (see `fused.py`) that turns the config's dimensions into `PartSpec`s.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from npu_fp.arch.base import LAYER_PATTERNS, PartSpec

# (tensor name, stored shape, dims, is_bias) -> parts
Splitter = Callable[[str, tuple[int, ...], "Dims", bool], tuple[PartSpec, ...]]

# A linear's ".bias" gets the bias role of its ".weight" role. Roles without an entry (the router
# among them: its bias is not the selection bias `moe.router_bias`) leave the bias unmapped.
BIAS_ROLES: dict[str, str] = {
    "attn.q": "attn.q_bias",
    "attn.k": "attn.k_bias",
    "attn.v": "attn.v_bias",
    "attn.o": "attn.o_bias",
    "attn.qkv": "attn.qkv_bias",
    "norm.input": "norm.input_bias",
    "norm.post_attn": "norm.post_attn_bias",
    "norm.attn_out": "norm.attn_out_bias",
    "norm.mlp_out": "norm.mlp_out_bias",
    "norm.final": "norm.final_bias",
    "embed.norm": "embed.norm_bias",
    "mlp.gate": "mlp.gate_bias",
    "mlp.up": "mlp.up_bias",
    "mlp.down": "mlp.down_bias",
    "pooler": "pooler_bias",
}

# Gains of normalisation layers: the roles a family's `norm_offset` applies to.
NORM_GAIN_ROLES: frozenset[str] = frozenset(
    {
        "norm.input",
        "norm.post_attn",
        "norm.attn_out",
        "norm.mlp_out",
        "norm.final",
        "embed.norm",
        "attn.q_norm",
        "attn.k_norm",
        "attn.q_a_norm",
        "attn.kv_a_norm",
    }
)

_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_hidden_size"),
}


def config_int(config: Mapping[str, Any], *keys: str) -> int | None:
    """The first of `keys` that config.json sets to an integer (None and missing are skipped)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            return value
        raise ValueError(f"config.json: {key}={value!r} must be an integer")
    return None


@dataclass(frozen=True, slots=True)
class Dims:
    """The sizes fused-tensor splits are computed from (None where config.json does not say)."""

    hidden: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    intermediate: int | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Dims:
        hidden = config_int(config, *_CONFIG_KEYS["hidden"])
        nh = config_int(config, *_CONFIG_KEYS["num_heads"])
        nkv = config_int(config, *_CONFIG_KEYS["num_kv_heads"]) or nh
        head_dim = config_int(config, "head_dim")
        if head_dim is None and hidden and nh:
            head_dim = hidden // nh
        return cls(hidden, nh, nkv, head_dim, config_int(config, *_CONFIG_KEYS["intermediate"]))

    def need(self, name: str, *fields: str) -> tuple[int, ...]:
        """The named sizes, or a ValueError saying which config.json key the split of `name` needs."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            keys = " / ".join(_CONFIG_KEYS[f][0] for f in missing)
            raise ValueError(f"{name}: splitting this fused tensor needs {keys} in config.json")
        return tuple(getattr(self, f) for f in fields)


@dataclass(frozen=True, slots=True)
class Rule:
    """How one module maps: `.weight` -> `role`, `.bias` -> BIAS_ROLES[role]."""

    role: str
    transposed: bool = False  # the weight is stored [in, out] (GPT-2 Conv1D)
    split: Splitter | None = None  # fused tensor: parts from the config


Table = Mapping[str, "str | Rule"]


@dataclass(frozen=True, slots=True)
class Family:
    """One adapter. Module paths are relative to the layer (`layers.{L}.`) or to the LM prefix."""

    name: str
    layer: Table  # module path inside a layer -> role
    globals: Table = field(default_factory=dict)  # trailing module path of non-layer tensors
    experts: Table = field(default_factory=dict)  # module inside `experts.{e}.`
    expert_containers: tuple[str, ...] = ("mlp",)  # what precedes `.experts.{e}.`
    params: Mapping[str, str] = field(default_factory=dict)  # whole parameter path in a layer
    layer_aux: frozenset[str] = frozenset()  # parameter paths in a layer that are buffers
    global_aux: tuple[str, ...] = ()  # first name components of task heads, kept as aux
    layer_patterns: tuple[re.Pattern[str], ...] = (LAYER_PATTERNS["layers"],)
    norm_offset: float = 0.0  # added to RMSNorm gains before comparison (Gemma: 1.0)
    mtp: bool = False  # layers past num_hidden_layers are multi-token-prediction blocks
    experts_per_group: int = 0  # MoGE group size (Pangu), 0 without expert groups
    warnings: tuple[str, ...] = ()  # things the builder wants reported (ignored config values)


def rule_of(entry: str | Rule) -> Rule:
    return entry if isinstance(entry, Rule) else Rule(entry)


def merged_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json with a multimodal `text_config` folded in: its sizes describe the LM."""
    text = config.get("text_config")
    merged = dict(config)
    if isinstance(text, Mapping):
        merged.update({k: v for k, v in text.items() if k not in ("architectures", "model_type")})
    return merged
