"""The demo zoo: small, deterministic checkpoints in Hugging Face layout, written with safetensors.

- `base`: a dense Qwen2-style model (biased q/k/v, GQA, untied head) with a tokenizer.json;
- `base-continued`: continued training of `base` (5% relative noise plus a low-rank drift);
- `moge-upcycled`: a Pangu Pro MoE-style MoGE model whose experts are slices of base's FFN plus
  noise, 8 groups, router_scale, o_proj bias, shared expert from the whole FFN;
- `independent`: the same shape, drawn from another seed with the same per-layer init scales.
The same seed gives the same bytes on every machine; the whole zoo is written in a few seconds.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

DEMO_MODELS = ("base", "base-continued", "moge-upcycled", "independent")
ZOO_VERSION = 1  # bump when the zoo's content changes, so stale caches are rebuilt

BASE_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
}


def default_zoo_dir() -> Path:
    root = os.environ.get("NPU_FP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "npu_fp"
    )
    return Path(root) / f"zoo-v{ZOO_VERSION}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_scale(layer: int, num_layers: int) -> float:
    # a depth trend plus a wiggle, so per-layer std profiles are not flat (as in real models)
    return 1.0 + 0.5 * layer / max(num_layers - 1, 1) + 0.15 * ((layer * 7) % 3 - 1)


def qwen2_config(shape: dict[str, int]) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **shape,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def dense_tensors(shape: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a Qwen2-style model, init scales following depth like trained models do."""
    g = _gen(seed)
    h, inter, n_layers = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
    )
    nh, nkv, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    d = h // nh

    def w(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * std

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, h, 0.02)}
    for layer in range(n_layers):
        s = 0.02 * _layer_scale(layer, n_layers)
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = w(nh * d, h, s)
        t[p + "self_attn.k_proj.weight"] = w(nkv * d, h, s * 1.3)
        t[p + "self_attn.v_proj.weight"] = w(nkv * d, h, s * 0.7)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * d, s / (2 * n_layers) ** 0.5)
        t[p + "self_attn.q_proj.bias"] = torch.randn(nh * d, generator=g) * 0.5 * (layer + 1)
        t[p + "self_attn.k_proj.bias"] = torch.randn(nkv * d, generator=g) * 1.0 * (layer + 1)
        t[p + "self_attn.v_proj.bias"] = torch.randn(nkv * d, generator=g) * 0.05
        t[p + "mlp.gate_proj.weight"] = w(inter, h, s)
        t[p + "mlp.up_proj.weight"] = w(inter, h, s)
        t[p + "mlp.down_proj.weight"] = w(h, inter, s / (2 * n_layers) ** 0.5)
        t[p + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
        t[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    t["model.norm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    t["lm_head.weight"] = w(vocab, h, 0.02)
    return t


def continued_training(
    base: dict[str, torch.Tensor], seed: int, rel_noise: float = 0.05, rank: int = 4
) -> dict[str, torch.Tensor]:
    """Each tensor plus 5% relative Gaussian noise, and a low-rank drift on every matrix."""
    g = _gen(seed)
    out = {}
    for name, x in base.items():
        y = x + rel_noise * x.std() * torch.randn(x.shape, generator=g)
        if x.ndim == 2:
            a = torch.randn(x.shape[0], rank, generator=g)
            b = torch.randn(rank, x.shape[1], generator=g)
            y = y + rel_noise * x.std() * (a @ b) / rank
        out[name] = y
    return out


def moge_upcycle(
    base: dict[str, torch.Tensor],
    shape: dict[str, int],
    seed: int,
    num_experts: int = 16,
    num_groups: int = 8,
    rel_noise: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Pangu Pro MoE-style MoGE model upcycled from a dense base (release tensor names)."""
    g = _gen(seed)
    h, inter, n_layers = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
    )
    slices = 4
    width = inter // slices

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + rel_noise * x.std() * torch.randn(x.shape, generator=g)

    out = {k: noisy(v) for k, v in base.items() if ".mlp." not in k}
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        gate, up = base[p + "mlp.gate_proj.weight"], base[p + "mlp.up_proj.weight"]
        down = base[p + "mlp.down_proj.weight"]
        out[p + "self_attn.o_proj.bias"] = 0.01 * torch.randn(h, generator=g)
        out[p + "mlp.gate.weight"] = 0.02 * torch.randn(num_experts, h, generator=g)
        out[p + "mlp.router_scale"] = 1.0 + 0.05 * torch.randn(1, num_experts, generator=g)
        for e in range(num_experts):
            sl = slice((e % slices) * width, (e % slices + 1) * width)
            q = p + f"mlp.experts.{e}."
            out[q + "gate_proj.weight"] = noisy(gate[sl])
            out[q + "up_proj.weight"] = noisy(up[sl])
            out[q + "down_proj.weight"] = noisy(down[:, sl])
        out[p + "mlp.shared_expert.gate_proj.weight"] = noisy(gate)
        out[p + "mlp.shared_expert.up_proj.weight"] = noisy(up)
        out[p + "mlp.shared_expert.down_proj.weight"] = noisy(down)
    config = {
        "architectures": ["PanguProMoEForCausalLM"],
        "model_type": "PanguProMoE",
        "hidden_size": h,
        "num_hidden_layers": n_layers,
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "vocab_size": shape["vocab_size"],
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": inter,
        "num_experts": num_experts,
        "num_experts_per_tok": num_groups,
        "num_groups": num_groups,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1.6e7,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    return out, config


def tokenizer_json(vocab_size: int) -> str:
    """A real `tokenizers` WordLevel tokenizer over the most frequent words of a bundled corpus."""
    words = collections.Counter(
        w for text in topics.values() for w in re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text)
    )
    specials = ["<unk>", "<|endoftext|>"]
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w, _ in ranked:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):  # pad a short corpus deterministically
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    return tok.to_str()


def write_checkpoint(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: str | None = None,
) -> Path:
    """config.json + model.safetensors (+ tokenizer.json), staged then renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    if tokenizer is not None:
        (tmp / "tokenizer.json").write_text(tokenizer)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def write_dense_base(
    out_dir: Path,
    seed: int = 0,
    shape: dict[str, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    shape = shape or BASE_SHAPE
    return write_checkpoint(
        out_dir,
        dense_tensors(shape, seed),
        qwen2_config(shape),
        dtype,
        tokenizer_json(shape["vocab_size"]),
    )


def build_demo_zoo(zoo_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the four demo models (skipped when a complete zoo of this version is there)."""
    zoo_dir = Path(zoo_dir)
    paths = {name: zoo_dir / name for name in DEMO_MODELS}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    shape = BASE_SHAPE
    tok = tokenizer_json(shape["vocab_size"])
    base = dense_tensors(shape, seed)
    write_checkpoint(paths["base"], base, qwen2_config(shape), tokenizer=tok)
    write_checkpoint(
        paths["base-continued"],
        continued_training(base, seed + 1),
        qwen2_config(shape),
        tokenizer=tok,
    )
    moe, moe_cfg = moge_upcycle(base, shape, seed + 2)
    write_checkpoint(paths["moge-upcycled"], moe, moe_cfg, tokenizer=tok)
    write_checkpoint(
        paths["independent"], dense_tensors(shape, seed + 1000), qwen2_config(shape), tokenizer=tok
    )
    return paths
