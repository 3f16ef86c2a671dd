"""Derivative builders: calibration zoos from a base checkpoint (HF Llama/Qwen2 layout, safetensors).

Each builder reads the base folder, applies one lineage-preserving (or, for `independent_matched`,
lineage-free) transformation and writes a new model folder with config.json, model.safetensors and,
where the base has one, a consistent tokenizer.json:

- `continued_training`: 5% relative noise plus a low-rank drift on every matrix;
- `permute`: function-preserving permutation of FFN units, attention heads (GQA-aware: KV groups,
  and query heads within a group) and optionally the hidden dimension;
- `prune_layers`: every other layer removed;
- `vocab_reorder_truncate`: token ids shuffled and the vocabulary cut, tokenizer.json rewritten;
- `mixtral_upcycle` / `moge_upcycle`: MoE models whose experts are copies / slices of the FFN;
- `resave`: the same weights in another dtype (bf16 by default);
- `independent_matched`: fresh random weights with each tensor's mean and std matched.

Command line: `python -m npu_fp.derive KIND BASE_DIR OUT_DIR [--seed N]`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from npu_fp import zoo

LAYER = "model.layers.{}."


class DeriveError(ValueError):
    """The base checkpoint is not in the layout these builders understand."""


def load_base(base_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    base = Path(base_dir)
    files = sorted(base.glob("*.safetensors"))
    if not files or not (base / "config.json").is_file():
        raise DeriveError(f"{base}: expected config.json and *.safetensors (HF layout)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update({k: v.to(torch.float32) for k, v in load_file(str(f)).items()})
    config = json.loads((base / "config.json").read_text())
    if LAYER.format(0) + "self_attn.q_proj.weight" not in tensors:
        raise DeriveError(
            f"{base}: no {LAYER.format(0)}self_attn.q_proj.weight; the builders "
            "need a Llama / Qwen2-style dense checkpoint"
        )
    tok = base / "tokenizer.json"
    return tensors, config, tok.read_text() if tok.is_file() else None


def _shape(config: dict) -> dict[str, int]:
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    return {k: int(config[k]) for k in keys}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _write(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tok: str | None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    return zoo.write_checkpoint(Path(out), tensors, config, dtype, tok)


def continued_training(
    base: str | Path, out: str | Path, seed: int = 1, rel_noise: float = 0.05, rank: int = 4
) -> Path:
    t, cfg, tok = load_base(base)
    return _write(out, zoo.continued_training(t, seed, rel_noise, rank), cfg, tok)


def permute(
    base: str | Path,
    out: str | Path,
    seed: int = 2,
    units: bool = True,
    heads: bool = True,
    hidden: bool = False,
) -> Path:
    """Function-preserving permutations (the model computes exactly the same function)."""
    t, cfg, tok = load_base(base)
    s = _shape(cfg)
    g = _gen(seed)
    h, nh, nkv = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = int(cfg.get("head_dim") or h // nh)
    per = nh // nkv
    for layer in range(s["num_hidden_layers"]):
        p = LAYER.format(layer)
        if units:
            perm = torch.randperm(t[p + "mlp.up_proj.weight"].shape[0], generator=g)
            for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t[p + name] = t[p + name][perm]
            t[p + "mlp.down_proj.weight"] = t[p + "mlp.down_proj.weight"][:, perm]
        if heads:
            kv = torch.randperm(nkv, generator=g)
            q = torch.cat([k * per + torch.randperm(per, generator=g) for k in kv.tolist()])
            for name, order, count in (("q_proj", q, nh), ("k_proj", kv, nkv), ("v_proj", kv, nkv)):
                w = p + f"self_attn.{name}.weight"
                t[w] = t[w].reshape(count, d, -1)[order].reshape(count * d, -1)
                if p + f"self_attn.{name}.bias" in t:
                    b = p + f"self_attn.{name}.bias"
                    t[b] = t[b].reshape(count, d)[order].reshape(-1)
            o = p + "self_attn.o_proj.weight"
            t[o] = t[o].reshape(t[o].shape[0], nh, d)[:, q].reshape(t[o].shape[0], nh * d)
    if hidden:
        rho = torch.randperm(h, generator=g)
        for name in list(t):
            x = t[name]
            if name.endswith(
                (
                    "q_proj.weight",
                    "k_proj.weight",
                    "v_proj.weight",
                    "gate_proj.weight",
                    "up_proj.weight",
                    "embed_tokens.weight",
                    "lm_head.weight",
                )
            ):
                t[name] = x[:, rho]
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                t[name] = x[rho]
            elif name.endswith(("layernorm.weight", "model.norm.weight", "o_proj.bias")):
                t[name] = x[rho]
    return _write(out, t, cfg, tok)


def prune_layers(base: str | Path, out: str | Path, keep_every: int = 2) -> Path:
    """Keep layers 0, k, 2k, ... (every other layer for k = 2), renumbered."""
    t, cfg, tok = load_base(base)
    n = int(cfg["num_hidden_layers"])
    kept = list(range(0, n, keep_every))
    new: dict[str, torch.Tensor] = {k: v for k, v in t.items() if not k.startswith("model.layers.")}
    for i, old in enumerate(kept):
        src, dst = LAYER.format(old), LAYER.format(i)
        new.update({dst + k[len(src) :]: v for k, v in t.items() if k.startswith(src)})
    return _write(out, new, {**cfg, "num_hidden_layers": len(kept)}, tok)


def _rewrite_tokenizer(tok: str, new_id: dict[int, int]) -> str:
    doc = json.loads(tok)
    model = doc["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        model["vocab"] = {
            k: new_id[v] for k, v in sorted(vocab.items(), key=lambda kv: kv[1]) if v in new_id
        }
        model["vocab"] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
        if isinstance(model.get("merges"), list):
            kept = set(model["vocab"])

            def ok(m: object) -> bool:
                parts = m.split(" ") if isinstance(m, str) else list(m)
                return all(x in kept for x in parts) and "".join(parts) in kept

            model["merges"] = [m for m in model["merges"] if ok(m)]
    elif isinstance(vocab, list):
        model["vocab"] = [vocab[old] for old, _ in sorted(new_id.items(), key=lambda kv: kv[1])]
    else:
        raise DeriveError("tokenizer.json: unsupported model.vocab layout")
    added = []
    for a in doc.get("added_tokens") or []:
        if a["id"] in new_id:
            added.append({**a, "id": new_id[a["id"]]})
    doc["added_tokens"] = added
    return json.dumps(doc, ensure_ascii=False)


def vocab_reorder_truncate(
    base: str | Path, out: str | Path, seed: int = 3, keep: float = 0.75
) -> Path:
    """Shuffle token ids and drop a quarter of the vocabulary (special tokens kept)."""
    t, cfg, tok = load_base(base)
    v = t["model.embed_tokens.weight"].shape[0]
    special = set()
    if tok is not None:
        doc = json.loads(tok)
        special = {a["id"] for a in doc.get("added_tokens") or []}
        unk = (doc.get("model") or {}).get("unk_token")
        vocab = (doc.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and unk in vocab:
            special.add(vocab[unk])
    g = _gen(seed)
    rest = [i for i in torch.randperm(v, generator=g).tolist() if i not in special]
    order = sorted(special) + rest[: max(1, int(keep * v)) - len(special)]
    order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    new_id = {old: new for new, old in enumerate(order)}
    idx = torch.tensor(order)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in t:
            t[name] = t[name][idx]
    tok = _rewrite_tokenizer(tok, new_id) if tok is not None else None
    return _write(out, t, {**cfg, "vocab_size": len(order)}, tok)


def mixtral_upcycle(
    base: str | Path, out: str | Path, seed: int = 4, num_experts: int = 4, rel_noise: float = 0.01
) -> Path:
    """Mixtral layout: every expert a noisy copy of the dense FFN (Mistral -> Mixtral)."""
    t, cfg, tok = load_base(base)
    s = _shape(cfg)
    g = _gen(seed)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + rel_noise * x.std() * torch.randn(x.shape, generator=g)

    new = {k: noisy(v) for k, v in t.items() if ".mlp." not in k}
    for layer in range(s["num_hidden_layers"]):
        p = LAYER.format(layer)
        moe = p + "block_sparse_moe."
        new[moe + "gate.weight"] = 0.02 * torch.randn(num_experts, s["hidden_size"], generator=g)
        for e in range(num_experts):
            for src, dst in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                new[moe + f"experts.{e}.{dst}.weight"] = noisy(t[p + f"mlp.{src}.weight"])
    config = {
        **cfg,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": num_experts,
        "num_experts_per_tok": 2,
    }
    return _write(out, new, config, tok)


def moge_upcycle(
    base: str | Path,
    out: str | Path,
    seed: int = 5,
    num_experts: int = 16,
    num_groups: int = 8,
    rel_noise: float = 0.1,
) -> Path:
    """Pangu Pro MoE layout (MoGE): experts are FFN slices plus noise, in groups."""
    t, cfg, tok = load_base(base)
    tensors, config = zoo.moge_upcycle(t, _shape(cfg), seed, num_experts, num_groups, rel_noise)
    return _write(out, tensors, config, tok)


def resave(base: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    t, cfg, tok = load_base(base)
    return _write(out, t, {**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}, tok, dtype)


def independent_matched(base: str | Path, out: str | Path, seed: int = 1000) -> Path:
    """No lineage at all: every tensor redrawn with the base tensor's mean and std."""
    t, cfg, tok = load_base(base)
    g = _gen(seed)
    new = {k: v.mean() + v.std() * torch.randn(v.shape, generator=g) for k, v in t.items()}
    return _write(out, new, cfg, tok)


BUILDERS: dict[str, Callable[..., Path]] = {
    "continued": continued_training,
    "permute": permute,
    "prune": prune_layers,
    "vocab": vocab_reorder_truncate,
    "mixtral": mixtral_upcycle,
    "moge": moge_upcycle,
    "bf16": resave,
    "independent": independent_matched,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m npu_fp.derive", description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=sorted(BUILDERS))
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    kw = {} if args.seed is None or args.kind in ("prune", "bf16") else {"seed": args.seed}
    print(BUILDERS[args.kind](args.base, args.out, **kw))


if __name__ == "__main__":
    main()
