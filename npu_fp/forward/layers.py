"""Architectures with a layer-streamed forward, and one layer at a time built from streamed weights.

Which tensors form layer L, and the MoE expert groups, come from the architecture registry
(`npu_fp.arch.map_roles`), the same role map the fingerprint uses. A `ForwardFamily` adds only what
running the layer needs: the transformers module whose decoder (or encoder) layer is reused, where
its attention and MLP branches sit (for the norm hooks) and how checkpoint names map onto that
module's state dict. A layer is constructed on the `meta` device from the model's config, its
tensors are read from the checkpoint straight onto the device, and `load_state_dict(assign=True)`
binds them, so no weights are ever initialised or held twice. Pangu Pro MoE has no transformers
module; its layer lives in `pangu.py`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from npu_fp.arch import map_roles
from npu_fp.arch.base import RoleMap, split_layer_name
from npu_fp.device import Device
from npu_fp.forward.errors import UnsupportedArchitectureError, WeightLayoutError
from npu_fp.forward.weights import WeightReader, map_layer
from npu_fp.io.safetensors_header import TensorRef


@dataclass(frozen=True, slots=True)
class ForwardFamily:
    name: str
    model_types: tuple[str, ...]
    hf_module: str  # transformers.models.<hf_module>.modeling_<hf_module>
    config_cls: str
    layer_cls: str
    rotary_cls: str | None  # None: no rotary embedding (BERT: learned absolute positions)
    attn_path: str = "self_attn"  # module whose output is the attention branch
    mlp_path: str = "mlp"  # module whose output is the MLP / MoE branch
    renames: tuple[tuple[str, str], ...] = ()
    encoder: bool = False
    keep_fp32: tuple[str, ...] = ()  # module tensors kept in fp32 whatever the compute dtype
    optional: tuple[str, ...] = ()  # buffers a checkpoint may omit (filled with zeros)
    architectures: tuple[str, ...] = field(default=())


FAMILIES: tuple[ForwardFamily, ...] = (
    ForwardFamily(
        "llama",
        ("llama",),
        "llama",
        "LlamaConfig",
        "LlamaDecoderLayer",
        "LlamaRotaryEmbedding",
        architectures=("LlamaForCausalLM",),
    ),
    ForwardFamily(
        "mistral",
        ("mistral",),
        "mistral",
        "MistralConfig",
        "MistralDecoderLayer",
        "MistralRotaryEmbedding",
        architectures=("MistralForCausalLM",),
    ),
    ForwardFamily(
        "qwen2",
        ("qwen2",),
        "qwen2",
        "Qwen2Config",
        "Qwen2DecoderLayer",
        "Qwen2RotaryEmbedding",
        architectures=("Qwen2ForCausalLM",),
    ),
    ForwardFamily(
        "qwen3",
        ("qwen3",),
        "qwen3",
        "Qwen3Config",
        "Qwen3DecoderLayer",
        "Qwen3RotaryEmbedding",
        architectures=("Qwen3ForCausalLM",),
    ),
    ForwardFamily(
        "mixtral",
        ("mixtral",),
        "mixtral",
        "MixtralConfig",
        "MixtralDecoderLayer",
        "MixtralRotaryEmbedding",
        renames=(("block_sparse_moe.", "mlp."),),
        architectures=("MixtralForCausalLM",),
    ),
    ForwardFamily(
        "qwen2_moe",
        ("qwen2_moe",),
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeDecoderLayer",
        "Qwen2MoeRotaryEmbedding",
        architectures=("Qwen2MoeForCausalLM",),
    ),
    ForwardFamily(
        "qwen3_moe",
        ("qwen3_moe",),
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeDecoderLayer",
        "Qwen3MoeRotaryEmbedding",
        architectures=("Qwen3MoeForCausalLM",),
    ),
    ForwardFamily(
        "deepseek_v3",
        ("deepseek_v3",),
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3DecoderLayer",
        "DeepseekV3RotaryEmbedding",
        keep_fp32=("e_score_correction_bias",),
        optional=("e_score_correction_bias",),
        architectures=("DeepseekV3ForCausalLM",),
    ),
    ForwardFamily(
        "bert",
        ("bert",),
        "bert",
        "BertConfig",
        "BertLayer",
        None,
        attn_path="attention.output.dense",
        mlp_path="output.dense",
        encoder=True,
        renames=((".gamma", ".weight"), (".beta", ".bias")),
        architectures=("BertModel", "BertForMaskedLM", "BertForPreTraining"),
    ),
    ForwardFamily(
        "pangu_moe",
        ("PanguProMoE", "pangu_pro_moe", "pangu_moe"),
        "llama",
        "LlamaConfig",
        "PanguProMoEDecoderLayer",
        "LlamaRotaryEmbedding",
        architectures=("PanguProMoEForCausalLM",),
    ),
)


def resolve_family(config: dict, where: str = "config.json") -> ForwardFamily:
    model_type = str(config.get("model_type", ""))
    archs = [str(a) for a in config.get("architectures") or []]
    for fam in FAMILIES:
        if model_type in fam.model_types or any(a in fam.architectures for a in archs):
            return fam
    names = sorted({t for f in FAMILIES for t in f.model_types})
    raise UnsupportedArchitectureError(
        f"{where}: model_type={model_type!r} architectures={archs} has no layer-streamed forward; "
        f"supported model_type values: {', '.join(names)} (or set activations.enabled=false)"
    )


def _modeling(family: ForwardFamily) -> Any:
    return importlib.import_module(
        f"transformers.models.{family.hf_module}.modeling_{family.hf_module}"
    )


def build_hf_config(family: ForwardFamily, config: dict) -> Any:
    if family.name == "pangu_moe":
        # optional: pangu.py builds on transformers (the `forward` extra), loaded on first use
        from npu_fp.forward.pangu import pangu_config

        hf = pangu_config(config)
    else:
        import transformers  # optional: the `forward` extra, loaded on first use

        keep = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
        hf = getattr(transformers, family.config_cls).from_dict(keep)
    hf._attn_implementation = "sdpa"
    # the per-expert loop runs on every device; grouped_mm kernels are not on every device
    hf._experts_implementation = "eager"
    return hf


def _layer_factory(family: ForwardFamily) -> Callable[[Any, int], nn.Module]:
    if family.name == "pangu_moe":
        # optional: pangu.py builds on transformers (the `forward` extra)
        from npu_fp.forward.pangu import PanguProMoEDecoderLayer

        return PanguProMoEDecoderLayer
    return getattr(_modeling(family), family.layer_cls)


def find_layer_tensors(
    rolemap: RoleMap, tensors: dict[str, TensorRef], num_layers: int, where: str
) -> tuple[str, dict[int, dict[str, TensorRef]]]:
    """(name prefix of the stack, {layer: {name within the layer: ref}}) for layers 0..n-1, as
    the architecture registry (npu_fp.arch) placed the tensors in layers."""
    by_prefix: dict[str, dict[int, dict[str, TensorRef]]] = {}
    for name, role in rolemap.roles.items():
        # MTP blocks past the last decoder layer (DeepSeek-V3 layer 61) are not in the forward
        if role.layer is None or role.kind == "mtp" or role.layer >= num_layers:
            continue
        prefix, local = split_layer_name(name, role.layer)
        by_prefix.setdefault(prefix, {}).setdefault(role.layer, {})[local] = tensors[name]
    full = [p for p, layers in by_prefix.items() if set(range(num_layers)) <= set(layers)]
    if len(full) != 1:
        found = {p: len(v) for p, v in by_prefix.items()}
        raise WeightLayoutError(
            f"{where}: expected one stack of layers 0..{num_layers - 1} (num_hidden_layers), "
            f"found {found or 'none'} (stack prefix: layers)"
        )
    return full[0], by_prefix[full[0]]


class StreamModel:
    """A checkpoint seen as embeddings + layers, each built on demand on the device."""

    def __init__(
        self,
        config: dict,
        tensors: dict[str, TensorRef],
        device: Device,
        dtype: torch.dtype,
        read_bytes: int,
        where: str = "config.json",
    ) -> None:
        self.family = resolve_family(config, where)
        self.hf_config = build_hf_config(self.family, config)
        try:  # the one architecture registry: which tensors sit in which layer, expert groups
            self.rolemap = map_roles(config, {n: r.shape for n, r in tensors.items()})
        except ValueError as e:
            raise WeightLayoutError(f"{where}: {e}") from None
        self.num_layers = int(self.hf_config.num_hidden_layers)
        self.hidden_size = int(self.hf_config.hidden_size)
        self.device = device
        self.dtype = dtype
        self.where = where
        self.tensors = tensors
        self.prefix, self.layer_tensors = find_layer_tensors(
            self.rolemap, tensors, self.num_layers, where
        )
        self._factory = _layer_factory(self.family)
        self.reader = WeightReader(tensors, device, read_bytes)
        self._rotary: nn.Module | None = None
        self._kwargs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.layer_experts: dict[int, int] = {}
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}
        self._plans: dict[int, dict] = {}

    # -- checks that need no device ---------------------------------------------------------
    def _meta_layer(self, i: int) -> nn.Module:
        with torch.device("meta"):
            return self._factory(self.hf_config, i)

    def validate(self) -> None:
        """Map every layer's tensors onto its module (names and shapes) before any data is read."""
        for i in range(self.num_layers):
            meta = self._meta_layer(i)
            expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
            self._plans[i] = map_layer(
                i, self.layer_tensors[i], expected, self.family.renames, self.family.optional
            )
            self._expected[i] = expected
            self.layer_experts[i] = _num_experts(meta)
        for name in self.embedding_names().values():
            if name not in self.tensors:
                raise WeightLayoutError(
                    f"{self.where}: embedding tensor {name!r} is missing from the checkpoint"
                )

    @property
    def max_experts(self) -> int:
        return max(self.layer_experts.values(), default=0)

    def experts_per_group(self) -> int | None:
        """Routing is reported per expert group where the architecture registry sees groups."""
        return self.rolemap.experts_per_group or None

    def layer_bytes(self, i: int) -> int:
        return sum(r.nbytes for r in self.layer_tensors[i].values())

    def resident_bytes(self, i: int) -> int:
        """Device bytes of layer i's module in the compute dtype (after validate())."""
        size = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for key, shape in self._expected[i].items():
            fp32 = self.family.keep_fp32 and key.endswith(self.family.keep_fp32)
            total += math.prod(shape) * (4 if fp32 else size)
        return total

    def max_positions(self) -> int | None:
        value = getattr(self.hf_config, "max_position_embeddings", None)
        return int(value) if value else None

    def embedding_names(self) -> dict[str, str]:
        p = self.prefix
        if not self.family.encoder:
            return {"tok": p + "embed_tokens.weight"}
        names = {
            "tok": p + "embeddings.word_embeddings.weight",
            "pos": p + "embeddings.position_embeddings.weight",
            "type": p + "embeddings.token_type_embeddings.weight",
        }
        for part, alt in (("weight", "gamma"), ("bias", "beta")):
            name = f"{p}embeddings.LayerNorm.{part}"
            names["ln_" + part] = name if name in self.tensors else f"{p}embeddings.LayerNorm.{alt}"
        return names

    # -- device work ------------------------------------------------------------------------
    def build_layer(self, i: int) -> nn.Module:
        if i not in self._plans:
            self.validate()
        layer = self._meta_layer(i)
        state = self.reader.load_state(
            self._plans[i], self._expected[i], self.dtype, self.family.keep_fp32
        )
        layer.load_state_dict(state, strict=True, assign=True)
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if t.is_meta:
                raise WeightLayoutError(
                    f"layer {i}: {name} has no value after loading "
                    "(a non-persistent buffer the forward cannot rebuild)"
                )
        return layer.eval().requires_grad_(False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (host) -> hidden states [B, T, H] on the device, compute dtype."""
        names = self.embedding_names()
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self.reader.gather_rows(self.tensors[names["tok"]], uniq, self.dtype)
        h = rows[inverse.to(rows.device)]
        if not self.family.encoder:
            return h
        t = ids.shape[1]
        pos = self.reader.gather_rows(self.tensors[names["pos"]], torch.arange(t), self.dtype)
        typ = self.reader.gather_rows(self.tensors[names["type"]], torch.tensor([0]), self.dtype)
        h = h + typ[0] + pos[None]  # BertEmbeddings order: words + token type, then + positions
        w = self._vector(names["ln_weight"])
        b = self._vector(names["ln_bias"])
        return nn.functional.layer_norm(
            h, (self.hidden_size,), w, b, eps=float(self.hf_config.layer_norm_eps)
        )

    def _vector(self, name: str) -> torch.Tensor:
        ref = self.tensors[name]
        dst = torch.empty(ref.shape, dtype=self.dtype, device=self.device.torch)
        self.reader.fill(ref, dst)
        return dst

    def layer_kwargs(self, i: int, batch: int, seq: int) -> dict[str, Any]:
        """Keyword arguments of layer i's forward for [batch, seq] inputs (cached per shape)."""
        key = (batch, seq)
        if key not in self._kwargs:
            self._kwargs[key] = self._make_kwargs(batch, seq)
        per_type = self._kwargs[key]
        types = getattr(self.hf_config, "layer_types", None)
        if types and types[i] == "sliding_attention" and len(per_type) > 1:
            return per_type[1]
        return per_type[0]

    def _make_kwargs(self, batch: int, seq: int) -> list[dict[str, Any]]:
        if self.family.encoder:
            return [{"attention_mask": None}]
        # optional: transformers is the `forward` extra, loaded on first use
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        dev = self.device.torch
        if self._rotary is None:
            rot_cls = getattr(_modeling(self.family), self.family.rotary_cls)
            self._rotary = rot_cls(config=self.hf_config).to(dev)
        dummy = torch.zeros(batch, seq, self.hidden_size, dtype=self.dtype, device=dev)
        pos = torch.arange(seq, device=dev)[None, :]
        pe = self._rotary(dummy, pos)
        args = {
            "config": self.hf_config,
            "inputs_embeds": dummy,
            "attention_mask": None,
            "past_key_values": None,
            "position_ids": pos,
        }
        out = [
            {
                "attention_mask": create_causal_mask(**args),
                "position_embeddings": pe,
                "position_ids": pos,
            }
        ]
        if "sliding_attention" in (getattr(self.hf_config, "layer_types", None) or ()):
            out.append({**out[0], "attention_mask": create_sliding_window_causal_mask(**args)})
        return out

    def close(self) -> None:
        self.reader.close()


def _num_experts(layer: nn.Module) -> int:
    for name, mod in layer.named_modules():
        if name.endswith("experts") and isinstance(
            getattr(mod, "gate_up_proj", None), torch.Tensor
        ):
            return int(mod.gate_up_proj.shape[0])
    return 0


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
