"""Derivative zoos for the comparison tests: one seeded fp32 base in HF layout, every derivative."""

from __future__ import annotations

from pathlib import Path

import torch

from npu_fp import derive, zoo

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
DERIVATIVES = ("continued", "permuted", "pruned", "vocab", "mixtral", "moge", "bf16")


def write_base(root: Path, seed: int = 0, shape: dict | None = None) -> Path:
    return zoo.write_dense_base(root, seed=seed, shape=shape or SHAPE, dtype=torch.float32)


def build_zoo(root: Path, seed: int = 0) -> dict[str, Path]:
    """base, its seven derivatives and a std-profile-matched independent model."""
    base = write_base(root / "base", seed)
    out = {"base": base}
    out["continued"] = derive.continued_training(base, root / "continued", seed + 1)
    out["permuted"] = derive.permute(base, root / "permuted", seed + 2, hidden=True)
    out["pruned"] = derive.prune_layers(base, root / "pruned")
    out["vocab"] = derive.vocab_reorder_truncate(base, root / "vocab", seed + 3)
    out["mixtral"] = derive.mixtral_upcycle(base, root / "mixtral", seed + 4)
    out["moge"] = derive.moge_upcycle(base, root / "moge", seed + 5)
    out["bf16"] = derive.resave(base, root / "bf16")
    out["independent"] = derive.independent_matched(base, root / "independent", seed + 1000)
    return out


def build_independents(root: Path, count: int, seed: int = 100) -> list[Path]:
    """`count` unrelated dense models (same shape and init scales, different seeds)."""
    tok = zoo.tokenizer_json(SHAPE["vocab_size"])
    out = []
    for i in range(count):
        t = zoo.dense_tensors(SHAPE, seed + i)
        out.append(
            zoo.write_checkpoint(root / f"indep{i}", t, zoo.qwen2_config(SHAPE), torch.float32, tok)
        )
    return out


def run_compare(
    models: list[Path], out: Path, fingerprint_plots: bool = False, **compare_kw: object
) -> dict:
    """The `npu-fp compare` body on one process; returns report.json as a dict.

    The fingerprint job's per-model profile figure is not under test here and costs most of a
    tiny model's fingerprint time, so it is skipped unless `fingerprint_plots`.
    """
    import json

    import pytest

    from npu_fp.commands import compare
    from npu_fp.config import CompareConfig, RunConfig
    from npu_fp.report import profile_plot

    signatures = compare_kw.pop("signatures", [])
    cfg = RunConfig(
        command="compare",
        out_dir=str(out),
        progress=False,
        device="cpu",
        compare=CompareConfig(
            models=[str(m) for m in models],
            signatures=[str(s) for s in signatures],  # type: ignore[union-attr]
            **compare_kw,
        ),
    )  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as mp:
        if not fingerprint_plots:
            mp.setattr(profile_plot, "plot_profiles", lambda sigs, path, stat="std": path)
        return json.loads(compare(cfg).read_text())


def pair(doc: dict, a: str, b: str) -> dict:
    for p in doc["pairs"]:
        if {p["a"], p["b"]} == {a, b}:
            return p
    raise KeyError((a, b))


def family(p: dict, kind: str) -> dict | None:
    return next((e for e in p["evidence"] if e["kind"] == kind), None)


def qwen2_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """A plain reference forward of a Qwen2-style checkpoint (RMSNorm, RoPE, GQA, SwiGLU)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, n = h // nh, cfg["rms_norm_eps"], ids.shape[0]

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms(x, w[p + "input_layernorm.weight"])
        q = (y @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(n, nh, d)
        k = (y @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(
            n, nkv, d
        )
        v = (y @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(
            n, nkv, d
        )
        q, k = rope(q.transpose(0, 1)), rope(k.transpose(0, 1))
        k = k.repeat_interleave(nh // nkv, 0)
        v = v.transpose(0, 1).repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / d**0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(n, h) @ w[p + "self_attn.o_proj.weight"].T
        y = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(y @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
