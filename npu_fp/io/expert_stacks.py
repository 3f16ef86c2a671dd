"""Fused 3-D expert tensors seen as one tensor per expert, without copying the stack.

transformers 5 keeps all routed experts of a layer in `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I] (reference/checkpoint-layouts.md 3.19), and GGUF stores
`blk.N.ffn_{gate,up,down}_exps.weight` [E, I, H] / [E, H, I]. The expert axis leads and the bytes
of one expert are contiguous, so expert e is a `TensorRef` over its own byte range, named like a
per-expert checkpoint: `mlp.experts.{e}.gate_up_proj.weight`, `blk.N.experts.{e}.ffn_gate.weight`,
MindFormers `feed_forward.routed_experts.ffn.experts.{e}.w1.weight`.
Role mapping, planning (MoGE groups stay whole), statistics and comparisons then see ordinary
per-expert tensors; `down_proj` slices even carry the name and bytes of an unfused checkpoint's.
"""

from __future__ import annotations

import dataclasses
import re

from npu_fp.io.safetensors_header import CheckpointError, TensorRef

_HF_STACK = re.compile(
    r"^(?P<prefix>(?:.*\.)?experts)\.(?P<leaf>gate_up_proj|gate_proj|up_proj|down_proj)$"
)
_GGUF_STACK = re.compile(
    r"^(?P<prefix>blk\.\d+)\.(?P<leaf>ffn_(?:gate_up|gate|up|down))_exps\.weight$"
)


# MindFormers' grouped-matmul MoE (MindSpore `.ckpt`): `feed_forward.routed_experts.ffn.w1/w2/w3`
# [E, in, out] (transpose_b=False, layouts doc 1.1); expert e is [in, out], mapped as transposed
_MINDFORMERS_STACK = re.compile(
    r"^(?P<prefix>(?:.*\.)?feed_forward\.routed_experts\.ffn)\.(?P<leaf>w1|w2|w3)\.weight$"
)


def _expert_name(name: str) -> str | None:
    """The per-expert name pattern ("{e}" left in) of a stack's name, None if not a stack."""
    if m := _HF_STACK.match(name):
        return f"{m['prefix']}.{{e}}.{m['leaf']}.weight"
    if m := _GGUF_STACK.match(name):
        return f"{m['prefix']}.experts.{{e}}.{m['leaf']}.weight"
    if m := _MINDFORMERS_STACK.match(name):
        return f"{m['prefix']}.experts.{{e}}.{m['leaf']}.weight"
    return None


def split_stacks(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """`tensors` with every 3-D expert stack replaced by one 2-D tensor per expert."""
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        pattern = _expert_name(name)
        if pattern is None or len(ref.shape) != 3:
            out[name] = ref
            continue
        experts, per = ref.shape[0], ref.nbytes // max(ref.shape[0], 1)
        for e in range(experts):
            sub = pattern.format(e=e)
            if sub in tensors or sub in out:
                raise CheckpointError(
                    f"{ref.file}: tensor {name!r}: expert {e} of this stack is also stored as "
                    f"{sub!r}; a checkpoint holds each expert once"
                )
            # the expert's bytes, wherever the stored pieces of the stack put them
            (begin, n), *rest = ref.pieces(e * per, per)
            out[sub] = dataclasses.replace(
                ref,
                name=sub,
                shape=ref.shape[1:],
                begin=begin,
                end=begin + n,
                extra=tuple((b, b + k) for b, k in rest),
            )
    return dict(sorted(out.items()))
