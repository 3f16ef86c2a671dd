"""Splitters for fused tensors: which index ranges of a stored tensor belong to q, k, v, gate, up.

Every splitter checks the stored shape against the sizes config.json implies and raises a ValueError
naming the tensor, its shape and the expected sizes, because a wrong split silently mixes roles.
"""

from __future__ import annotations

from npu_fp.arch.base import PartSpec, contiguous_parts
from npu_fp.arch.spec import Dims, Splitter

_QKV = (("q", "attn.q"), ("k", "attn.k"), ("v", "attn.v"))
_GATE_UP = (("gate", "mlp.gate"), ("up", "mlp.up"))


def _role(role: str, bias: bool) -> str:
    return f"{role}_bias" if bias else role


def _check(
    name: str,
    shape: tuple[int, ...],
    bias: bool,
    dim: int,
    total: int,
    other: int | None,
    layout: str,
) -> None:
    """Raise unless `shape` is [total] (bias) or has `total` along `dim` and `other` across it."""
    if bias:
        expected: list[int | str] = [total]
    else:
        expected = [other if other is not None else "*"] * 2
        expected[dim] = total
    ok = len(shape) == len(expected) and all(
        e == "*" or s == e for s, e in zip(shape, expected, strict=True)
    )
    if not ok:
        raise ValueError(
            f"{name}: stored shape {list(shape)} does not match the {layout} layout; expected "
            f"{expected}. Check num_attention_heads / num_key_value_heads / head_dim / hidden_size "
            f"/ intermediate_size in config.json against the checkpoint."
        )


def _qkv_sizes(name: str, dims: Dims) -> tuple[int, int, int, str]:
    nh, nkv, d = dims.need(name, "num_heads", "num_kv_heads", "head_dim")
    desc = f"q {nh * d} + k {nkv * d} + v {nkv * d} (heads {nh}, kv heads {nkv}, head_dim {d})"
    return nh * d, nkv * d, nkv * d, desc


def qkv_contiguous(weight_dim: int = 0) -> Splitter:
    """q; k; v one after another along `weight_dim` of the weight (dim 0 of the bias).

    Phi-3 `qkv_proj`, Baichuan2 `W_pack` (weight_dim 0); GPT-2 `c_attn`, a Conv1D stored
    [in, out] (weight_dim 1).
    """

    def split(name: str, shape: tuple[int, ...], dims: Dims, bias: bool) -> tuple[PartSpec, ...]:
        q, k, v, desc = _qkv_sizes(name, dims)
        dim = 0 if bias else weight_dim
        _check(name, shape, bias, dim, q + k + v, dims.hidden, f"fused q|k|v [{desc}]")
        sizes = [(p, _role(r, bias), n) for (p, r), n in zip(_QKV, (q, k, v), strict=True)]
        return contiguous_parts(sizes, dim=dim)

    return split


def qkv_grouped(name: str, shape: tuple[int, ...], dims: Dims, bias: bool) -> tuple[PartSpec, ...]:
    """InternLM2 `wqkv`: rows viewed as [nkv, nh/nkv + 2, d]; per KV group the q heads, then k, v."""
    nh, nkv, d = dims.need(name, "num_heads", "num_kv_heads", "head_dim")
    if nh % nkv:
        raise ValueError(
            f"{name}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}; "
            "the grouped wqkv layout needs whole groups"
        )
    per_kv = nh // nkv
    slot = (per_kv + 2) * d
    desc = f"grouped [kv heads {nkv} x (q {per_kv} + k 1 + v 1) x head_dim {d}]"
    _check(name, shape, bias, 0, nkv * slot, dims.hidden, desc)
    q = tuple((g * slot, g * slot + per_kv * d) for g in range(nkv))
    k = tuple((g * slot + per_kv * d, g * slot + (per_kv + 1) * d) for g in range(nkv))
    v = tuple((g * slot + (per_kv + 1) * d, (g + 1) * slot) for g in range(nkv))
    return tuple(
        PartSpec(p, _role(r, bias), 0, ranges)
        for (p, r), ranges in zip(_QKV, (q, k, v), strict=True)
    )


def gate_up_halves(
    name: str, shape: tuple[int, ...], dims: Dims, bias: bool
) -> tuple[PartSpec, ...]:
    """Phi-3 `gate_up_proj` [2I, H]: first half gate, second half up."""
    (inter,) = dims.need(name, "intermediate")
    _check(name, shape, bias, 0, 2 * inter, dims.hidden, f"gate|up [gate {inter} + up {inter}]")
    return contiguous_parts([(p, _role(r, bias), inter) for p, r in _GATE_UP], dim=0)


_EXPERT_GATE_UP = (("gate", "moe.expert.gate"), ("up", "moe.expert.up"))


def expert_gate_up_halves(
    name: str, shape: tuple[int, ...], dims: Dims, bias: bool
) -> tuple[PartSpec, ...]:
    """One expert of a fused `experts.gate_up_proj` stack, [2Ie, H]: first half gate, second up
    (transformers 5 `chunk(2, dim=-1)` of the expert's output)."""
    if len(shape) != 2 or shape[0] % 2 or (dims.hidden is not None and shape[1] != dims.hidden):
        raise ValueError(
            f"{name}: stored shape {list(shape)} does not match the fused expert gate|up layout; "
            f"expected [2 * expert intermediate size, hidden_size={dims.hidden}] per expert "
            "(an [E, H, 2I] stack stored [in, out] is not supported)"
        )
    half = shape[0] // 2
    return contiguous_parts([(p, r, half) for p, r in _EXPERT_GATE_UP], dim=0)
