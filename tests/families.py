"""Tiny, correctly shaped Hugging Face-layout checkpoints for every family the adapters know.

`write_family_checkpoint(family, out_dir)` writes `config.json` and `model.safetensors` with the exact
tensor names and shapes of that family's real checkpoints at toy sizes (hidden 32, 4 heads, 2 KV
heads, 3 layers, vocab 128, a few experts). `family_spec` gives the config and the shapes without
writing anything; `part_view` extracts one part of a fused tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from npu_fp.arch.base import PartSpec

Shapes = dict[str, tuple[int, ...]]

H, NH, NKV, INTER, VOCAB, LAYERS = 32, 4, 2, 64, 128, 3


def part_view(t: torch.Tensor, spec: PartSpec) -> torch.Tensor:
    """The elements of fused tensor `t` that belong to `spec` (its ranges concatenated)."""
    return torch.cat([t.narrow(spec.dim, a, b - a) for a, b in spec.ranges], dim=spec.dim)


def _config(arch: str, model_type: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": H,
        "num_attention_heads": NH,
        "num_key_value_heads": NKV,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    cfg.update(extra)
    return cfg


def _head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _attn(
    p: str,
    c: dict[str, Any],
    *,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
) -> Shapes:
    h, d = c["hidden_size"], _head_dim(c)
    q, kv = c["num_attention_heads"] * d, c.get("num_key_value_heads", c["num_attention_heads"]) * d
    s: Shapes = {
        f"{p}self_attn.q_proj.weight": (q, h),
        f"{p}self_attn.k_proj.weight": (kv, h),
        f"{p}self_attn.v_proj.weight": (kv, h),
        f"{p}self_attn.o_proj.weight": (h, q),
    }
    if qkv_bias:
        s |= {
            f"{p}self_attn.q_proj.bias": (q,),
            f"{p}self_attn.k_proj.bias": (kv,),
            f"{p}self_attn.v_proj.bias": (kv,),
        }
    if o_bias:
        s[f"{p}self_attn.o_proj.bias"] = (h,)
    if qk_norm:
        s |= {f"{p}self_attn.q_norm.weight": (d,), f"{p}self_attn.k_norm.weight": (d,)}
    return s


def _mla(p: str, c: dict[str, Any]) -> Shapes:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    kvl, ql = c["kv_lora_rank"], c.get("q_lora_rank")
    s: Shapes = {
        f"{p}self_attn.kv_a_proj_with_mqa.weight": (kvl + c["qk_rope_head_dim"], h),
        f"{p}self_attn.kv_a_layernorm.weight": (kvl,),
        f"{p}self_attn.kv_b_proj.weight": (nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), kvl),
        f"{p}self_attn.o_proj.weight": (h, nh * c["v_head_dim"]),
    }
    if ql is None:
        s[f"{p}self_attn.q_proj.weight"] = (nh * qk, h)
    else:
        s |= {
            f"{p}self_attn.q_a_proj.weight": (ql, h),
            f"{p}self_attn.q_a_layernorm.weight": (ql,),
            f"{p}self_attn.q_b_proj.weight": (nh * qk, ql),
        }
    return s


SWIGLU = ("gate_proj", "up_proj", "down_proj")


def _mlp(p: str, h: int, inter: int, names: tuple[str, str, str] = SWIGLU) -> Shapes:
    gate, up, down = names
    return {
        f"{p}{gate}.weight": (inter, h),
        f"{p}{up}.weight": (inter, h),
        f"{p}{down}.weight": (h, inter),
    }


def _norms(p: str, h: int, *names: str) -> Shapes:
    return {f"{p}{n}.weight": (h,) for n in names}


def _hf_globals(c: dict[str, Any], prefix: str = "model.", head: str = "lm_head.") -> Shapes:
    s: Shapes = {
        f"{prefix}embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
        f"{prefix}norm.weight": (c["hidden_size"],),
    }
    if not c.get("tie_word_embeddings"):
        s[f"{head}weight"] = (c["vocab_size"], c["hidden_size"])
    return s


PRE = ("input_layernorm", "post_attention_layernorm")
GEMMA_SW = PRE + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _dense(
    c: dict[str, Any], *, prefix: str = "model.", norms: tuple[str, ...] = PRE, **attn: bool
) -> Shapes:
    """Llama-layout decoder: attention (options as `_attn`), SwiGLU MLP, the given norms."""
    s = _hf_globals(c, prefix)
    h = c["hidden_size"]
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        s |= _attn(p, c, **attn) | _norms(p, h, *norms)
        s |= _mlp(f"{p}mlp.", h, c["intermediate_size"])
    return s


# ---- families ------------------------------------------------------------------------------


def _llama(**o: Any) -> tuple[dict, Shapes]:
    c = _config("LlamaForCausalLM", "llama", rope_theta=500000.0, **o)
    return c, _dense(c)


def _mistral(**o: Any) -> tuple[dict, Shapes]:
    c = _config("MistralForCausalLM", "mistral", sliding_window=64, **o)
    return c, _dense(c)


def _qwen2(**o: Any) -> tuple[dict, Shapes]:
    c = _config("Qwen2ForCausalLM", "qwen2", **o)
    return c, _dense(c, qkv_bias=True)


def _qwen3(**o: Any) -> tuple[dict, Shapes]:
    # head_dim 16 makes q_proj's output (64) differ from hidden (32), as in real Qwen3 models
    c = _config("Qwen3ForCausalLM", "qwen3", head_dim=16, attention_bias=False, **o)
    return c, _dense(c, qk_norm=True)


def _gemma(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "GemmaForCausalLM",
        "gemma",
        head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        **o,
    )
    return c, _dense(c)


def _gemma2(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "Gemma2ForCausalLM",
        "gemma2",
        head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        query_pre_attn_scalar=16,
        **o,
    )
    return c, _dense(c, norms=GEMMA_SW)


def _gemma3(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "Gemma3ForCausalLM",
        "gemma3_text",
        head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        query_pre_attn_scalar=16,
        **o,
    )
    return c, _dense(c, norms=GEMMA_SW, qk_norm=True)


def _openpangu(sandwich: bool, **o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "PanguEmbeddedForCausalLM",
        "PanguEmbedded",
        bias=True,
        sandwich_norm=sandwich,
        rope_theta=16000000.0,
        **o,
    )
    norms = PRE + (("pre_mlp_layernorm", "post_mlp_layernorm") if sandwich else ())
    return c, _dense(c, norms=norms, qkv_bias=True, o_bias=True)


def _baichuan2(**o: Any) -> tuple[dict, Shapes]:
    c = _config("BaichuanForCausalLM", "baichuan", model_max_length=256, **o)
    c.pop("num_key_value_heads")  # Baichuan2 has no GQA: W_pack is [3H, H]
    s = _hf_globals(c)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= {f"{p}self_attn.W_pack.weight": (3 * H, H), f"{p}self_attn.o_proj.weight": (H, H)}
        s |= _mlp(f"{p}mlp.", H, INTER) | _norms(p, H, *PRE)
    return c, s


def _phi3(**o: Any) -> tuple[dict, Shapes]:
    c = _config("Phi3ForCausalLM", "phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2, **o)
    d = _head_dim(c)
    s = _hf_globals(c)
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= {
            f"{p}self_attn.qkv_proj.weight": (qkv, H),
            f"{p}self_attn.o_proj.weight": (H, H),
            f"{p}mlp.gate_up_proj.weight": (2 * INTER, H),
            f"{p}mlp.down_proj.weight": (H, INTER),
        }
        s |= _norms(p, H, *PRE)
    return c, s


def _internlm2(**o: Any) -> tuple[dict, Shapes]:
    c = _config("InternLM2ForCausalLM", "internlm2", bias=False, rope_theta=1000000.0, **o)
    d = _head_dim(c)
    s: Shapes = {
        "model.tok_embeddings.weight": (VOCAB, H),
        "model.norm.weight": (H,),
        "output.weight": (VOCAB, H),
    }
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= {f"{p}attention.wqkv.weight": (qkv, H), f"{p}attention.wo.weight": (H, H)}
        s |= _mlp(f"{p}feed_forward.", H, INTER, ("w1", "w3", "w2"))
        s |= _norms(p, H, "attention_norm", "ffn_norm")
    return c, s


def _gpt2(**o: Any) -> tuple[dict, Shapes]:
    # HF `gpt2` layout: no `transformer.` prefix, causal-mask buffers, head tied to wte.
    c = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": H,
        "n_head": NH,
        "n_layer": LAYERS,
        "n_positions": 64,
        "n_ctx": 64,
        "n_inner": None,
        "vocab_size": VOCAB,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": True,
        **o,
    }
    s: Shapes = {
        "wte.weight": (VOCAB, H),
        "wpe.weight": (c["n_positions"], H),
        "ln_f.weight": (H,),
        "ln_f.bias": (H,),
    }
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        s |= {
            f"{p}ln_1.weight": (H,),
            f"{p}ln_1.bias": (H,),
            f"{p}ln_2.weight": (H,),
            f"{p}ln_2.bias": (H,),
            f"{p}attn.c_attn.weight": (H, 3 * H),
            f"{p}attn.c_attn.bias": (3 * H,),
            f"{p}attn.c_proj.weight": (H, H),
            f"{p}attn.c_proj.bias": (H,),
            f"{p}mlp.c_fc.weight": (H, 4 * H),
            f"{p}mlp.c_fc.bias": (4 * H,),
            f"{p}mlp.c_proj.weight": (4 * H, H),
            f"{p}mlp.c_proj.bias": (H,),
            f"{p}attn.bias": (1, 1, c["n_positions"], c["n_positions"]),
        }
    return c, s


def _bert(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "BertForPreTraining",
        "bert",
        type_vocab_size=2,
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        **o,
    )
    for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        c.pop(key)
    P = c["max_position_embeddings"]
    s: Shapes = {
        "bert.embeddings.word_embeddings.weight": (VOCAB, H),
        "bert.embeddings.position_embeddings.weight": (P, H),
        "bert.embeddings.token_type_embeddings.weight": (2, H),
        "bert.embeddings.LayerNorm.weight": (H,),
        "bert.embeddings.LayerNorm.bias": (H,),
        "bert.embeddings.position_ids": (1, P),
        "bert.pooler.dense.weight": (H, H),
        "bert.pooler.dense.bias": (H,),
        "cls.predictions.bias": (VOCAB,),
        "cls.predictions.transform.dense.weight": (H, H),
        "cls.predictions.transform.dense.bias": (H,),
        "cls.predictions.transform.LayerNorm.weight": (H,),
        "cls.predictions.transform.LayerNorm.bias": (H,),
        "cls.seq_relationship.weight": (2, H),
        "cls.seq_relationship.bias": (2,),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for m, shape in (
            ("attention.self.query", (H, H)),
            ("attention.self.key", (H, H)),
            ("attention.self.value", (H, H)),
            ("attention.output.dense", (H, H)),
            ("intermediate.dense", (INTER, H)),
            ("output.dense", (H, INTER)),
            ("attention.output.LayerNorm", (H,)),
            ("output.LayerNorm", (H,)),
        ):
            s |= {f"{p}{m}.weight": shape, f"{p}{m}.bias": (shape[0],)}
    return c, s


def _moe_layer(
    p: str,
    c: dict[str, Any],
    n_experts: int,
    ie: int,
    names: tuple[str, str, str] = SWIGLU,
    container: str = "mlp.",
) -> Shapes:
    """Router `{container}gate` [E, H] and experts `{container}experts.{e}.*`."""
    h = c["hidden_size"]
    s: Shapes = {f"{p}{container}gate.weight": (n_experts, h)}
    for e in range(n_experts):
        s |= _mlp(f"{p}{container}experts.{e}.", h, ie, names)
    return s


def _qwen2_moe(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=False,
        **o,
    )
    s = _hf_globals(c)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= _attn(p, c, qkv_bias=True) | _norms(p, H, *PRE)
        if i in c["mlp_only_layers"]:
            s |= _mlp(f"{p}mlp.", H, INTER)
            continue
        s |= _moe_layer(p, c, c["num_experts"], c["moe_intermediate_size"])
        s |= _mlp(f"{p}mlp.shared_expert.", H, c["shared_expert_intermediate_size"])
        s[f"{p}mlp.shared_expert_gate.weight"] = (1, H)
    return c, s


def _qwen3_moe(**o: Any) -> tuple[dict, Shapes]:
    c = _config(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        **o,
    )
    s = _hf_globals(c)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= _attn(p, c, qk_norm=True) | _norms(p, H, *PRE)
        s |= _moe_layer(p, c, c["num_experts"], c["moe_intermediate_size"])
    return c, s


def _mixtral(**o: Any) -> tuple[dict, Shapes]:
    c = _config("MixtralForCausalLM", "mixtral", num_local_experts=4, num_experts_per_tok=2, **o)
    s = _hf_globals(c)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= _attn(p, c) | _norms(p, H, *PRE)
        s |= _moe_layer(
            p, c, c["num_local_experts"], INTER, ("w1", "w3", "w2"), container="block_sparse_moe."
        )
    return c, s


def _pangu_pro_moe(**o: Any) -> tuple[dict, Shapes]:
    # 16 experts in the release's 8 groups: 2 experts per group, expert ids up to 15
    c = _config(
        "PanguProMoEForCausalLM",
        "PanguProMoE",
        num_experts=16,
        num_experts_per_tok=8,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=32,
        rope_theta=16000000.0,
        **o,
    )
    s = _hf_globals(c)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= _attn(p, c, qkv_bias=True, o_bias=True) | _norms(p, H, *PRE)
        s |= _moe_layer(p, c, c["num_experts"], c["moe_intermediate_size"])
        s |= _mlp(f"{p}mlp.shared_expert.", H, c["shared_expert_intermediate_size"])
        s[f"{p}mlp.router_scale"] = (1, c["num_experts"])
    return c, s


def _deepseek(v3: bool, fp8: bool = False, **o: Any) -> tuple[dict, Shapes]:
    common = dict(
        n_routed_experts=4,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        num_key_value_heads=NH,
    )
    if v3:
        common |= dict(
            q_lora_rank=24,
            n_group=2,
            topk_group=1,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=1,
        )
        c = _config("DeepseekV3ForCausalLM", "deepseek_v3", **(common | o))
    else:  # V2-Lite style: no q LoRA, plain q_proj
        common |= dict(q_lora_rank=None, topk_method="greedy")
        c = _config("DeepseekV2ForCausalLM", "deepseek_v2", **(common | o))
    if fp8:
        c["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    n, ie = c["n_routed_experts"], c["moe_intermediate_size"]
    s = _hf_globals(c)
    n_mtp = c.get("num_nextn_predict_layers", 0)
    for i in range(c["num_hidden_layers"] + n_mtp):
        p = f"model.layers.{i}."
        s |= _mla(p, c) | _norms(p, H, *PRE)
        if i < c["first_k_dense_replace"]:
            s |= _mlp(f"{p}mlp.", H, INTER)
        else:
            s |= _moe_layer(p, c, n, ie)
            s |= _mlp(f"{p}mlp.shared_experts.", H, ie * c["n_shared_experts"])
            if v3:
                s[f"{p}mlp.gate.e_score_correction_bias"] = (n,)
        if i >= c["num_hidden_layers"]:  # MTP block: a decoder layer plus its own head parts
            s |= {
                f"{p}enorm.weight": (H,),
                f"{p}hnorm.weight": (H,),
                f"{p}eh_proj.weight": (H, 2 * H),
                f"{p}embed_tokens.weight": (VOCAB, H),
                f"{p}shared_head.norm.weight": (H,),
                f"{p}shared_head.head.weight": (VOCAB, H),
            }
    if fp8:  # block scales [ceil(out/128), ceil(in/128)] for every quantised projection
        for name, shape in list(s.items()):
            module = name.rsplit(".", 2)[-2]
            if ".layers." in name and "_proj" in module and name.endswith(".weight"):
                s[name.replace(".weight", ".weight_scale_inv")] = (
                    -(-shape[0] // 128),
                    -(-shape[1] // 128),
                )
    return c, s


_VISION = {
    "depth": 2,
    "embed_dim": 16,
    "hidden_size": H,
    "num_heads": 2,
    "mlp_ratio": 4,
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
}


def _qwen2_vision(p: str) -> Shapes:
    e = _VISION["embed_dim"]
    s: Shapes = {
        f"{p}patch_embed.proj.weight": (e, 3, 2, 14, 14),
        f"{p}merger.ln_q.weight": (e,),
        f"{p}merger.ln_q.bias": (e,),
        f"{p}merger.mlp.0.weight": (4 * e, 4 * e),
        f"{p}merger.mlp.0.bias": (4 * e,),
        f"{p}merger.mlp.2.weight": (H, 4 * e),
        f"{p}merger.mlp.2.bias": (H,),
    }
    for i in range(_VISION["depth"]):
        b = f"{p}blocks.{i}."
        for m, shape in (
            ("attn.qkv", (3 * e, e)),
            ("attn.proj", (e, e)),
            ("mlp.fc1", (4 * e, e)),
            ("mlp.fc2", (e, 4 * e)),
            ("norm1", (e,)),
            ("norm2", (e,)),
        ):
            s |= {f"{b}{m}.weight": shape, f"{b}{m}.bias": (shape[0],)}
    return s


_VISION_25 = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_heads": 2,
    "out_hidden_size": H,
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 56,
    "fullatt_block_indexes": [1],
}


def _qwen2_5_vision(p: str) -> Shapes:
    e, i = _VISION_25["hidden_size"], _VISION_25["intermediate_size"]
    s: Shapes = {
        f"{p}patch_embed.proj.weight": (e, 3, 2, 14, 14),
        f"{p}merger.ln_q.weight": (e,),
        f"{p}merger.mlp.0.weight": (4 * e, 4 * e),
        f"{p}merger.mlp.0.bias": (4 * e,),
        f"{p}merger.mlp.2.weight": (H, 4 * e),
        f"{p}merger.mlp.2.bias": (H,),
    }
    for b in range(_VISION_25["depth"]):
        s |= {f"{p}blocks.{b}.norm1.weight": (e,), f"{p}blocks.{b}.norm2.weight": (e,)}
        for m, shape in (
            ("attn.qkv", (3 * e, e)),
            ("attn.proj", (e, e)),
            ("mlp.gate_proj", (i, e)),
            ("mlp.up_proj", (i, e)),
            ("mlp.down_proj", (e, i)),
        ):
            s |= {f"{p}blocks.{b}.{m}.weight": shape, f"{p}blocks.{b}.{m}.bias": (shape[0],)}
    return s


def _qwen2_vl(**o: Any) -> tuple[dict, Shapes]:
    # Hub Qwen2-VL layout: text sizes at the top level, `model.*` LM, `visual.*` tower.
    c = _config(
        "Qwen2VLForConditionalGeneration",
        "qwen2_vl",
        vision_config=dict(_VISION),
        bos_token_id=0,
        eos_token_id=1,
        **o,
    )
    return c, _dense(c, qkv_bias=True) | _qwen2_vision("visual.")


def _qwen2_5_vl(**o: Any) -> tuple[dict, Shapes]:
    # transformers 4.52+ save layout: `model.language_model.*`, `model.visual.*`, top-level head,
    # text sizes in `text_config`.
    text = _config("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_text", **o)
    text.pop("architectures")
    c = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": dict(_VISION_25),
        "tie_word_embeddings": False,
    }
    return c, _dense(text, prefix="model.language_model.", qkv_bias=True) | _qwen2_5_vision(
        "model.visual."
    )


_BUILDERS: dict[str, Callable[..., tuple[dict, Shapes]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "deepseek_v2": lambda **o: _deepseek(False, **o),
    "deepseek_v3": lambda **o: _deepseek(True, **o),
    "deepseek_v3_fp8": lambda **o: _deepseek(True, fp8=True, **o),
    "pangu_pro_moe": _pangu_pro_moe,
    "openpangu_dense": lambda **o: _openpangu(False, **o),
    "openpangu_dense_sandwich": lambda **o: _openpangu(True, **o),
    "baichuan2": _baichuan2,
    "gpt2": _gpt2,
    "bert": _bert,
    "internlm2": _internlm2,
    "phi3": _phi3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
}
FAMILIES: list[str] = list(_BUILDERS)


def family_spec(family: str, **overrides: Any) -> tuple[dict[str, Any], Shapes]:
    """config.json contents and tensor name -> shape for `family` (overrides go into the config)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _BUILDERS[family](**overrides)


def _is_norm_gain(name: str) -> bool:
    return name.endswith((".weight", ".gamma")) and any(
        k in name for k in ("norm", "LayerNorm", "ln_")
    )


def make_tensors(
    config: dict[str, Any], shapes: Shapes, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic values: N(0, 0.02) weights, norm gains near 1 (near 0 for Gemma), buffers."""
    gen = torch.Generator().manual_seed(seed)
    gemma = config["model_type"].startswith("gemma")
    fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        elif name.endswith("attn.bias") and len(shape) == 4:  # GPT-2 causal mask
            out[name] = torch.tril(torch.ones(shape[-2:], dtype=dtype)).reshape(shape)
        elif name.endswith(("e_score_correction_bias", "weight_scale_inv")):
            out[name] = torch.rand(shape, generator=gen, dtype=torch.float32) + 0.5
        else:
            t = torch.randn(shape, generator=gen) * 0.02
            if (_is_norm_gain(name) and len(shape) == 1 and not gemma) or "router_scale" in name:
                t += 1.0
            keep_fp8 = fp8 and name.replace(".weight", ".weight_scale_inv") in shapes
            out[name] = t.to(torch.float8_e4m3fn if keep_fp8 else dtype).contiguous()
    return out


def write_checkpoint(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], out_dir: Path
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def write_family_checkpoint(
    family: str, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write `config.json` + `model.safetensors` of a tiny `family` checkpoint; returns out_dir."""
    config, shapes = family_spec(family)
    return write_checkpoint(config, make_tensors(config, shapes, seed, dtype), out_dir)
