"""Tiny random checkpoints, a tiny real tokenizer and reference forwards for the activation tests.

Also a torchrun worker (`python -m torch.distributed.run ... tests/forward_helpers.py MODEL OUT`)
that runs the activation step in data and pipeline mode and writes the results as JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container; for dictionaries, the number of keys.",
    "Pangu and Qwen share a geometry of forty eight layers with biased projections.",
    "def f(x): return x * 2 + 1  # comments and code, 0123456789",
    "Mixture of grouped experts routes one expert per group to balance the devices.",
]


def make_tokenizer(folder: Path, vocab_size: int = 120) -> Path:
    """A BPE tokenizer trained in memory on a few sentences (ids < vocab_size), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_config(family: str, layers: int = 2):
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(intermediate_size=64, num_key_value_heads=2, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            head_dim=16,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    if family == "qwen3":
        return tf.Qwen3Config(intermediate_size=64, num_key_value_heads=2, head_dim=16, **common)
    if family == "mixtral":
        return tf.MixtralConfig(
            intermediate_size=48,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_shared_experts=1,
            **common,
        )
    if family == "bert":
        return tf.BertConfig(intermediate_size=64, **common)
    raise KeyError(family)


def save_hf_model(family: str, folder: Path, layers: int = 2, seed: int = 0):
    """A random transformers model saved with its tokenizer; returns the fp32 model (eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    model = tf.BertModel(cfg) if family == "bert" else tf.AutoModelForCausalLM.from_config(cfg)
    if family == "deepseek_v3":  # a non-zero selection bias, so the buffer is really exercised
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
    model.eval()
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return model


def hf_layers(model) -> list:
    return list(model.encoder.layer) if hasattr(model, "encoder") else list(model.model.layers)


def reference_outputs(model, family: str, ids: torch.Tensor) -> dict:
    """Full-model forward with hooks: per layer residual / attn / mlp tensors and routing counts."""
    attn_path, mlp_path = (
        ("attention.output.dense", "output.dense") if family == "bert" else ("self_attn", "mlp")
    )
    out: dict = {"residual": {}, "attn": {}, "mlp": {}, "routing": {}}
    handles = []

    def keep(kind: str, i: int):
        def hook(_m, _a, o):
            out[kind][i] = (o[0] if isinstance(o, tuple) else o).detach().clone()

        return hook

    def route(i: int):
        def hook(_m, _a, o):
            counts = torch.bincount(o[2].reshape(-1), minlength=o[0].shape[-1])
            out["routing"][i] = out["routing"].get(i, 0) + counts

        return hook

    for i, layer in enumerate(hf_layers(model)):
        handles.append(layer.register_forward_hook(keep("residual", i)))
        handles.append(layer.get_submodule(attn_path).register_forward_hook(keep("attn", i)))
        handles.append(layer.get_submodule(mlp_path).register_forward_hook(keep("mlp", i)))
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and not isinstance(gate, torch.nn.Linear):
            handles.append(gate.register_forward_hook(route(i)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return out


# -- Pangu Pro MoE: a checkpoint with the release's tensor names and a direct reference forward ----

PANGU_CONFIG = {
    "architectures": ["PanguProMoEForCausalLM"],
    "model_type": "PanguProMoE",
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "num_experts": 8,
    "num_experts_per_tok": 4,
    "rope_theta": 1.6e7,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def pangu_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    e, ie, i_s = (
        cfg["num_experts"],
        cfg["moe_intermediate_size"],
        cfg["shared_expert_intermediate_size"],
    )

    def r(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t = {
        "model.embed_tokens.weight": r(cfg["vocab_size"], h, std=1.0),
        "model.norm.weight": 1 + r(h),
        "lm_head.weight": r(cfg["vocab_size"], h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, rows in (("q", nh * d), ("k", nkv * d), ("v", nkv * d)):
            t[p + f"self_attn.{name}_proj.weight"] = r(rows, h)
            t[p + f"self_attn.{name}_proj.bias"] = r(rows)
        t[p + "self_attn.o_proj.weight"] = r(h, nh * d)
        t[p + "self_attn.o_proj.bias"] = r(h)
        t[p + "input_layernorm.weight"] = 1 + r(h)
        t[p + "post_attention_layernorm.weight"] = 1 + r(h)
        t[p + "mlp.gate.weight"] = r(e, h, std=0.5)
        t[p + "mlp.router_scale"] = 1 + r(1, e)
        for x in range(e):
            t[p + f"mlp.experts.{x}.gate_proj.weight"] = r(ie, h)
            t[p + f"mlp.experts.{x}.up_proj.weight"] = r(ie, h)
            t[p + f"mlp.experts.{x}.down_proj.weight"] = r(h, ie)
        t[p + "mlp.shared_expert.gate_proj.weight"] = r(i_s, h)
        t[p + "mlp.shared_expert.up_proj.weight"] = r(i_s, h)
        t[p + "mlp.shared_expert.down_proj.weight"] = r(h, i_s)
    return t


def save_pangu(folder: Path, layers: int = 2, seed: int = 0) -> tuple[dict, dict]:
    from safetensors.torch import save_file

    cfg = {**PANGU_CONFIG, "num_hidden_layers": layers}
    tensors = pangu_tensors(cfg, seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    make_tokenizer(folder)
    return cfg, tensors


def release_routing(logits: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's rule, token by token: softmax over all experts, top-1 inside each group."""
    probs = torch.softmax(logits.float(), dim=-1)
    size = probs.shape[-1] // groups
    idx = torch.empty(probs.shape[0], groups, dtype=torch.int64)
    w = torch.empty(probs.shape[0], groups)
    for t in range(probs.shape[0]):
        for g in range(groups):
            block = probs[t, g * size : (g + 1) * size].tolist()
            best = max(range(size), key=lambda j: (block[j], -j))  # first maximum wins
            idx[t, g] = g * size + best
            w[t, g] = block[best]
    return w, idx


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mlp(x: torch.Tensor, t: dict, p: str) -> torch.Tensor:
    return F.linear(
        F.silu(F.linear(x, t[p + "gate_proj.weight"])) * F.linear(x, t[p + "up_proj.weight"]),
        t[p + "down_proj.weight"],
    )


def pangu_reference(cfg: dict, t: dict, ids: torch.Tensor) -> dict:
    """The release's forward (eager attention, per-expert loop), fp32, from the raw tensors."""
    b, s = ids.shape
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, e = h // nh, cfg["rms_norm_eps"], cfg["num_experts"]
    groups = cfg["num_experts_per_tok"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    emb = torch.cat([torch.outer(torch.arange(s).float(), inv)] * 2, dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rot(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)

    mask = torch.full((s, s), float("-inf")).triu(1)
    x = t["model.embed_tokens.weight"][ids]
    out: dict = {"residual": {}, "attn": {}, "mlp": {}, "routing": {}}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = _rms(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = (
            F.linear(a, t[p + f"self_attn.{n}_proj.weight"], t[p + f"self_attn.{n}_proj.bias"])
            .view(b, s, -1, d)
            .transpose(1, 2)
            for n in "qkv"
        )
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = (z.repeat_interleave(nh // nkv, dim=1) for z in (k, v))
        att = torch.softmax(
            q @ k.transpose(2, 3) / math.sqrt(d) + mask, dim=-1, dtype=torch.float32
        )
        o = (att @ v).transpose(1, 2).reshape(b, s, h)
        o = F.linear(o, t[p + "self_attn.o_proj.weight"], t[p + "self_attn.o_proj.bias"])
        x = x + o
        m_in = _rms(x, t[p + "post_attention_layernorm.weight"], eps).reshape(-1, h)
        w, idx = release_routing(F.linear(m_in, t[p + "mlp.gate.weight"]), groups)
        y = torch.zeros_like(m_in)
        for ex in range(e):
            tok, slot = torch.where(idx == ex)
            if len(tok):
                y_e = _mlp(m_in[tok], t, p + f"mlp.experts.{ex}.")
                y.index_add_(0, tok, y_e * w[tok, slot, None] * t[p + "mlp.router_scale"][0, ex])
        y = (y + _mlp(m_in, t, p + "mlp.shared_expert.")).view(b, s, h)
        x = x + y
        out["attn"][layer], out["mlp"][layer], out["residual"][layer] = o, y, x
        out["routing"][layer] = torch.bincount(idx.reshape(-1), minlength=e)
    return out


# -- torchrun worker ------------------------------------------------------------------------------


# run name -> (activations.mode, activations.resident_bytes): pipeline keeps stages resident when
# they fit the automatic budget (a tiny model always does); pipeline_stream forces streaming
RUNS = {"data": ("data", None), "pipeline": ("pipeline", None), "pipeline_stream": ("pipeline", 0)}


def activation_runs(
    ctx, model_dir: str, runs: tuple[str, ...] = ("data", "pipeline")
) -> dict | None:
    """The activation step for each run of RUNS named; rank 0 gets {run: result dict}."""
    from npu_fp.activations import run_activations
    from npu_fp.config import ActivationsConfig
    from npu_fp.io.source import open_model

    results = {}
    source = open_model(model_dir)
    for run in runs:
        mode, resident_bytes = RUNS[run]
        cfg = ActivationsConfig(
            batch_size=2,
            seq_len=16,
            num_batches=5,
            seed=3,
            mode=mode,
            pass_batches=2,
            layers_per_block=1,
            resident_bytes=resident_bytes,
        )
        res = run_activations(ctx, cfg, source.root, source)
        if res is not None:
            results[run] = {
                "rows": res.rows,
                "routing": res.routing,
                "settings": res.settings,
                "reads": res.reads,
            }
    return results or None


def _worker(model_dir: str, out_path: str, runs: str) -> None:
    from npu_fp.dist import distributed

    with distributed("cpu") as ctx:
        results = activation_runs(ctx, model_dir, tuple(runs.split(",")))
    if results is not None:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "data,pipeline")
