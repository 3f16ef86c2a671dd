"""Canonical roles: what every tensor name means, independent of the family that wrote it.

An adapter turns a checkpoint's tensor name (plus its shape and the model's config.json) into a
`TensorRole`. Fused tensors (Baichuan `W_pack`, GPT-2 `c_attn`, InternLM2 `wqkv`, Phi-3 `qkv_proj`
and `gate_up_proj`) carry `PartSpec`s that say which index ranges along which dimension belong to which
role, so statistics are computed for the whole tensor and for each part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["weight", "aux", "scale", "mtp"]

# Canonical role vocabulary, one name per function in the layer whatever the family. Experts use
# "moe.expert.{gate,up,down}" with `expert` set; shared experts "moe.shared.{gate,up,down}".
ROLES: frozenset[str] = frozenset(
    {
        "embed.tok",
        "embed.pos",
        "embed.type",
        "embed.norm",
        "embed.norm_bias",
        "head.lm",
        "norm.final",
        "norm.final_bias",
        "pooler",
        "pooler_bias",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "attn.qkv",
        "attn.q_bias",
        "attn.k_bias",
        "attn.v_bias",
        "attn.o_bias",
        "attn.qkv_bias",
        "attn.q_norm",
        "attn.k_norm",
        "attn.q_a",
        "attn.q_a_norm",
        "attn.q_b",
        "attn.kv_a",
        "attn.kv_a_norm",
        "attn.kv_b",
        "norm.input",
        "norm.post_attn",
        "norm.attn_out",
        "norm.mlp_out",
        "norm.input_bias",
        "norm.post_attn_bias",
        "norm.attn_out_bias",
        "norm.mlp_out_bias",
        "mlp.gate",
        "mlp.up",
        "mlp.down",
        "mlp.gate_up",
        "mlp.gate_bias",
        "mlp.up_bias",
        "mlp.down_bias",
        "moe.router",
        "moe.router_bias",
        "moe.router_scale",
        "moe.shared_gate",
        "moe.expert.gate",
        "moe.expert.up",
        "moe.expert.down",
        "moe.expert.gate_up",
        "moe.shared.gate",
        "moe.shared.up",
        "moe.shared.down",
        "mtp",
        "aux",
        "other",
    }
)


# Named role groups: the roles that stages (profiles, plots, pairwise tests) treat together.
ATTENTION: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o")
QKV_BIASES: tuple[str, ...] = ("attn.q_bias", "attn.k_bias", "attn.v_bias")
ATTENTION_BIASES: tuple[str, ...] = (*QKV_BIASES, "attn.o_bias")
MLA: tuple[str, ...] = ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b")
DENSE_FFN: tuple[str, ...] = ("mlp.gate", "mlp.up", "mlp.down")
EXPERT_FFN: tuple[str, ...] = ("moe.expert.gate", "moe.expert.up", "moe.expert.down")
SHARED_FFN: tuple[str, ...] = ("moe.shared.gate", "moe.shared.up", "moe.shared.down")
LAYER_NORMS: tuple[str, ...] = ("norm.input", "norm.post_attn", "norm.attn_out", "norm.mlp_out")


@dataclass(frozen=True, slots=True)
class PartSpec:
    """One role inside a fused tensor: index ranges along `dim` of the stored tensor."""

    part: str  # short name: "q", "k", "v", "gate", "up"
    role: str  # canonical role of the part, e.g. "attn.q"
    dim: int  # 0 = rows of the stored tensor, 1 = columns (GPT-2 Conv1D stores [in, out])
    ranges: tuple[tuple[int, int], ...]  # half-open [start, stop) along `dim`, in order

    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


@dataclass(frozen=True, slots=True)
class TensorRole:
    """Where a tensor sits in the model. `layer` is None for global tensors (embeddings, head)."""

    name: str
    role: str
    layer: int | None = None
    expert: int | None = None
    group: int | None = None
    kind: Kind = "weight"
    transposed: bool = False  # stored [in, out] (GPT-2 Conv1D, MindSpore transpose_b=False)
    norm_offset: float = 0.0  # Gemma stores RMSNorm gains as w with (1 + w) applied: offset 1.0
    parts: tuple[PartSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        assert self.role in ROLES, f"adapter produced unknown role {self.role!r} for {self.name}"
        for p in self.parts:
            assert p.role in ROLES, f"adapter produced unknown part role {p.role!r} for {self.name}"


@dataclass(frozen=True, slots=True)
class RoleMap:
    """The result of mapping a whole checkpoint."""

    arch: str  # adapter name, e.g. "qwen2", "pangu_moe", "fallback"
    roles: dict[str, TensorRole]  # every mapped tensor, including aux ones
    unmapped: tuple[str, ...]  # names no rule matched (kept, with role "other")
    num_layers: int
    num_experts: int  # routed experts per MoE layer, 0 for dense
    experts_per_group: int  # MoGE group size; 0 when the model has no expert groups
    warnings: tuple[str, ...] = ()


LAYER_PATTERNS = {
    "layers": re.compile(r"(?:^|\.)layers\.(\d+)\."),
    "h": re.compile(r"(?:^|\.)h\.(\d+)\."),
    "bert": re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\."),
}
EXPERT_PATTERN = re.compile(r"\.experts\.(\d+)\.")


def split_layer_name(name: str, layer: int) -> tuple[str, str]:
    """(stack prefix, name inside the layer) of a tensor of `layer`: `model.layers.3.mlp.x` ->
    (`model.`, `mlp.x`); `bert.encoder.layer.0.output.dense.weight` -> (`bert.`, ...)."""
    for pattern in LAYER_PATTERNS.values():
        for m in pattern.finditer(name):
            if int(m.group(1)) == layer:
                start = m.start() + (name[m.start()] == ".")
                return name[:start], name[m.end() :]
    raise ValueError(f"{name}: no layer index {layer} in the name")


def contiguous_parts(sizes: list[tuple[str, str, int]], dim: int = 0) -> tuple[PartSpec, ...]:
    """Parts laid out one after another along `dim`: [(part, role, size), ...]."""
    out, start = [], 0
    for part, role, size in sizes:
        out.append(PartSpec(part, role, dim, ((start, start + size),)))
        start += size
    return tuple(out)
