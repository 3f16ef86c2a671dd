"""The derivative builders: function preservation, consistent tokenizers, expected layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compare_fixtures import SHAPE, qwen2_logits, write_base
from safetensors.torch import load_file

from npu_fp import derive
from npu_fp.arch import map_roles
from npu_fp.io.source import open_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("derive") / "base")


def test_permutation_preserves_the_function(base: Path, tmp_path: Path) -> None:
    out = derive.permute(base, tmp_path / "perm", seed=7, units=True, heads=True, hidden=True)
    ids = torch.tensor([1, 5, 9, 33, 2, 100, 7])
    a, b = qwen2_logits(base, ids), qwen2_logits(out, ids)
    assert torch.allclose(a, b, atol=1e-9, rtol=0)
    wa, wb = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(wa[name], wb[name])  # really permuted, not a copy


def test_vocabulary_rewrite_is_consistent(base: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = derive.vocab_reorder_truncate(base, tmp_path / "vocab", seed=3, keep=0.75)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == int(0.75 * SHAPE["vocab_size"])
    ta = Tokenizer.from_file(str(base / "tokenizer.json"))
    tb = Tokenizer.from_file(str(out / "tokenizer.json"))
    ea = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    eb = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert eb.shape[0] == cfg["vocab_size"]
    shared = set(ta.get_vocab()) & set(tb.get_vocab())
    assert len(shared) == cfg["vocab_size"]
    for tok in sorted(shared)[:50]:
        assert torch.equal(ea[ta.token_to_id(tok)], eb[tb.token_to_id(tok)])
    assert ta.get_vocab() != tb.get_vocab()


@pytest.mark.parametrize(
    "kind,arch,experts,group_size", [("mixtral", "mixtral", 4, 0), ("moge", "pangu_pro_moe", 16, 2)]
)
def test_upcycled_layouts_map(
    base: Path, tmp_path: Path, kind: str, arch: str, experts: int, group_size: int
) -> None:
    out = derive.BUILDERS[kind](base, tmp_path / kind)
    src = open_model(out)
    rm = map_roles(src.config, {n: r.shape for n, r in src.tensors.items()})
    assert rm.arch == arch and rm.num_experts == experts and rm.experts_per_group == group_size
    assert not rm.unmapped


def test_prune_and_resave_and_independent(base: Path, tmp_path: Path) -> None:
    pruned = derive.prune_layers(base, tmp_path / "pruned")
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 2
    wa, wp = (
        load_file(str(base / "model.safetensors")),
        load_file(str(pruned / "model.safetensors")),
    )
    assert torch.equal(
        wa["model.layers.2.mlp.up_proj.weight"], wp["model.layers.1.mlp.up_proj.weight"]
    )
    bf = derive.resave(base, tmp_path / "bf16")
    assert open_model(bf).tensors["lm_head.weight"].dtype == "BF16"
    ind = derive.independent_matched(base, tmp_path / "ind")
    wi = load_file(str(ind / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert wi[name].std().item() == pytest.approx(wa[name].std().item(), rel=0.05)


def test_bad_base_is_named(tmp_path: Path) -> None:
    with pytest.raises(derive.DeriveError, match="config.json"):
        derive.continued_training(tmp_path, tmp_path / "x")
