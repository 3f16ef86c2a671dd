"""The engine behind `map_roles`: scope the language model, walk every name through a `Family`.

Order of decisions for one tensor name:
1. outside the language-model scope (vision / audio towers, projectors) -> aux;
2. quantisation scales -> kind "scale"; known buffers (inv_freq, position_ids, ...) -> aux;
3. inside `layers.{L}.`: MTP block if L >= num_hidden_layers and the family has MTP, else the
   family's layer tables (experts through `experts.{e}.`);
4. otherwise the family's global table (embeddings, final norm, head).
Whatever no rule matches keeps role "other" and is listed in a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from npu_fp.arch.base import EXPERT_PATTERN, RoleMap, TensorRole
from npu_fp.arch.spec import BIAS_ROLES, NORM_GAIN_ROLES, Dims, Family, config_int, rule_of

log = logging.getLogger(__name__)

# Last name component -> not a weight. `weight_scale_inv` is DeepSeek-V3's FP8 block scale.
_SCALE_PARAMS = frozenset({"weight_scale_inv", "weight_scale", "input_scale"})
_AUX_PARAMS = frozenset(
    {"inv_freq", "position_ids", "masked_bias", "kv_cache_scale", "kv_cache_offset"}
)
# Training checkpoints (MindSpore / MindFormers, layouts doc 1.3): optimizer state, by the first
# name component (`adam_m.model.layers.0...` must not map as the layer's weight), and the
# optimizer's own scalars, by the whole name.
_OPTIMIZER_STATE = frozenset({"adam_m", "adam_v", "moments", "accu_grads", "moment1", "moment2"})
_OPTIMIZER_SCALARS = frozenset(
    {
        "global_step",
        "learning_rate",
        "beta1_power",
        "beta2_power",
        "scale_sense",
        "current_iterator_step",
        "last_overflow_iterator_step",
    }
)
# Name components that mark a non-LM tower in a multimodal checkpoint.
_TOWERS = frozenset(
    {
        "visual",
        "vision_tower",
        "vision_model",
        "vision_encoder",
        "image_encoder",
        "audio_tower",
        "audio_model",
        "audio_encoder",
        "multi_modal_projector",
        "mm_projector",
        "vision_projector",
        "talker",
        "token2wav",
    }
)
# other spellings of `weight` / `bias`: TensorFlow-era BERT LayerNorm names, MindSpore embeddings
_OLD_NORM_NAMES = {"gamma": "weight", "beta": "bias", "embedding_weight": "weight"}
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_NUM_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def num_experts_in(config: Mapping[str, Any]) -> int:
    return config_int(config, *_NUM_EXPERT_KEYS) or 0


def lm_scope(names: Iterable[str], lm_prefix: str | None) -> dict[str, str | None]:
    """Each name -> its name relative to the language model, or None when it is not LM."""
    names = list(names)
    if lm_prefix is not None:
        return {n: n[len(lm_prefix) :] if n.startswith(lm_prefix) else None for n in names}
    # `model.language_model.` (transformers >= 4.52 VL models) or `language_model.` (LLaVA-style).
    marks = Counter(
        n[: n.index("language_model.") + len("language_model.")]
        for n in names
        if n.startswith("language_model.") or ".language_model." in n
    )
    prefix = marks.most_common(1)[0][0] if marks else ""
    out: dict[str, str | None] = {}
    for n in names:
        if prefix:
            if n.startswith(prefix):
                out[n] = n[len(prefix) :]
            else:  # a VL model may keep its head outside the language model
                out[n] = n if n.split(".", 1)[0] == "lm_head" else None
        else:
            head = []
            for part in n.split("."):
                if part.isdigit():
                    break
                head.append(part)
            out[n] = None if _TOWERS.intersection(head) else n
    return out


class _Mapper:
    def __init__(self, family: Family, config: Mapping[str, Any]) -> None:
        self.family = family
        self.dims = Dims.from_config(config)
        self.num_layers = config_int(config, *_NUM_LAYER_KEYS)
        mtp_layers = config_int(config, "num_nextn_predict_layers", "num_mtp_layers") or 0
        self.mtp = family.mtp or mtp_layers > 0

    def layer_of(self, local: str) -> tuple[int | None, str]:
        for pattern in self.family.layer_patterns:
            m = pattern.search(local)
            if m:
                return int(m.group(1)), local[m.end() :]
        return None, local

    def classify(self, name: str, local: str, shape: tuple[int, ...]) -> TensorRole | None:
        if local.split(".", 1)[0] in _OPTIMIZER_STATE or local in _OPTIMIZER_SCALARS:
            return TensorRole(name, "aux", kind="aux")
        layer, rest = self.layer_of(local)
        em = EXPERT_PATTERN.search("." + rest) if layer is not None else None
        expert = int(em.group(1)) if em else None
        param = local.rsplit(".", 1)[-1]
        if param in _SCALE_PARAMS:
            return TensorRole(name, "aux", layer=layer, expert=expert, kind="scale")
        if param in _AUX_PARAMS:
            return TensorRole(name, "aux", layer=layer, kind="aux")
        if layer is None:
            return self._global(name, local, shape)
        if self.num_layers is not None and layer >= self.num_layers:
            if self.mtp:
                return TensorRole(name, "mtp", layer=layer, expert=expert, kind="mtp")
            raise ValueError(
                f"{name}: layer index {layer} >= num_hidden_layers={self.num_layers} in "
                "config.json, and this family has no MTP layers: the config does not describe "
                "this checkpoint (for a multimodal checkpoint, pass lm_prefix to scope the "
                "language model)"
            )
        fam = self.family
        if rest in fam.layer_aux:
            return TensorRole(name, "aux", layer=layer, kind="aux")
        if rest in fam.params:
            return TensorRole(name, fam.params[rest], layer=layer)
        if em is not None:
            # em indexes "." + rest; the container is what precedes ".experts.{e}."
            container, inner = rest[: max(em.start() - 1, 0)], rest[em.end() - 1 :]
            return self._expert(name, container, inner, layer, expert, shape)
        module, param = _split_param(rest)
        entry = fam.layer.get(module)
        return None if entry is None else self._role(name, entry, param, shape, layer)

    def _expert(
        self, name: str, container: str, inner: str, layer: int, expert: int, shape: tuple[int, ...]
    ) -> TensorRole | None:
        module, param = _split_param(inner)
        entry = self.family.experts.get(module)
        if entry is None or param != "weight" or container not in self.family.expert_containers:
            return None
        rule = rule_of(entry)
        parts = rule.split(name, shape, self.dims, False) if rule.split else ()
        epg = self.family.experts_per_group
        group = expert // epg if epg else None
        return TensorRole(
            name,
            rule.role,
            layer=layer,
            expert=expert,
            group=group,
            transposed=rule.transposed,
            parts=parts,
        )

    def _global(self, name: str, local: str, shape: tuple[int, ...]) -> TensorRole | None:
        if local.split(".", 1)[0] in self.family.global_aux:
            return TensorRole(name, "aux", kind="aux")
        module, param = _split_param(local)
        for key, entry in self.family.globals.items():
            if module == key or module.endswith("." + key):
                return self._role(name, entry, param, shape, None)
        return None

    def _role(
        self, name: str, entry: Any, param: str, shape: tuple[int, ...], layer: int | None
    ) -> TensorRole | None:
        rule = rule_of(entry)
        if param == "weight":
            role, bias = rule.role, False
        elif param == "bias" and rule.role in BIAS_ROLES:
            role, bias = BIAS_ROLES[rule.role], True
        else:
            return None
        parts = rule.split(name, shape, self.dims, bias) if rule.split else ()
        return TensorRole(
            name,
            role,
            layer=layer,
            transposed=rule.transposed and not bias,
            norm_offset=self.family.norm_offset if role in NORM_GAIN_ROLES else 0.0,
            parts=parts,
        )


def _split_param(path: str) -> tuple[str, str]:
    module, _, param = path.rpartition(".")
    return module, _OLD_NORM_NAMES.get(param, param)


def map_family(
    family: Family,
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    lm_prefix: str | None = None,
) -> RoleMap:
    """Map every tensor of a checkpoint with `family`'s rules (config already text-merged)."""
    mapper = _Mapper(family, config)
    warnings = list(family.warnings)
    roles: dict[str, TensorRole] = {}
    unmapped: list[str] = []
    for name, local in lm_scope(shapes, lm_prefix).items():
        if local is None:
            roles[name] = TensorRole(name, "aux", kind="aux")
            continue
        role = mapper.classify(name, local, tuple(shapes[name]))
        if role is None:
            unmapped.append(name)
            layer, rest = mapper.layer_of(local)
            em = EXPERT_PATTERN.search("." + rest) if layer is not None else None
            role = TensorRole(name, "other", layer=layer, expert=int(em.group(1)) if em else None)
        roles[name] = role
    if unmapped:
        warnings.append(
            f"{family.name}: {len(unmapped)} tensor(s) matched no rule and were kept with role "
            f"'other': {_few(unmapped)}"
        )
    num_layers = _check_layers(family, mapper.num_layers, roles.values(), warnings)
    num_experts = _check_experts(family, num_experts_in(config), roles.values(), warnings)
    for w in warnings:
        log.warning(w)
    return RoleMap(
        arch=family.name,
        roles=roles,
        unmapped=tuple(unmapped),
        num_layers=num_layers,
        num_experts=num_experts,
        experts_per_group=family.experts_per_group,
        warnings=tuple(warnings),
    )


def _few(items: list, limit: int = 20) -> str:
    """Names joined, indices as a list, cut at `limit`: a warning line stays short whatever the
    checkpoint holds."""
    more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
    head = items[:limit]
    if head and isinstance(head[0], str):
        return ", ".join(head) + more
    return "[" + ", ".join(map(str, head)) + more + "]"


def _check_layers(
    family: Family, from_config: int | None, roles: Iterable[TensorRole], warnings: list[str]
) -> int:
    found = {r.layer for r in roles if r.layer is not None and r.kind in ("weight", "aux")}
    if from_config is None:
        n = max(found) + 1 if found else 0
        warnings.append(f"{family.name}: config.json gives no layer count; {n} found in names")
        return n
    missing = sorted(set(range(from_config)) - found)
    if found and missing:
        warnings.append(
            f"{family.name}: config.json says {from_config} layers but no tensor names layer(s) "
            f"{_few(missing)}"
        )
    return from_config


def _check_experts(
    family: Family, from_config: int, roles: Iterable[TensorRole], warnings: list[str]
) -> int:
    found = {r.expert for r in roles if r.expert is not None and r.kind == "weight"}
    if not found:
        return 0 if not family.experts else from_config
    n_found = max(found) + 1
    if not from_config:
        warnings.append(f"{family.name}: config.json gives no expert count; {n_found} found")
        return n_found
    if n_found > from_config:
        raise ValueError(
            f"expert index {n_found - 1} found in tensor names but config.json says "
            f"{from_config} routed experts"
        )
    if len(found) < from_config:
        missing = sorted(set(range(from_config)) - found)
        warnings.append(f"{family.name}: no tensor names routed expert(s) {_few(missing)}")
    return from_config
