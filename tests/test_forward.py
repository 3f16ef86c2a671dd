"""Layer-streamed forward: equality with full-model reference forwards, Pangu MoGE routing, outputs."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import replace

import pytest
import torch
from forward_helpers import (
    PANGU_CONFIG,
    pangu_reference,
    reference_outputs,
    release_routing,
    save_hf_model,
    save_pangu,
)

from npu_fp.activations import ActivationResult, run_activations
from npu_fp.config import ActivationsConfig
from npu_fp.device import free_memory_bytes, resolve_device
from npu_fp.dist import DistContext
from npu_fp.forward.corpus import make_batches
from npu_fp.forward.layers import StreamModel, build_hf_config, resolve_family
from npu_fp.forward.pangu import PanguMoGEBlock
from npu_fp.forward.stream import LayerStreamer, NormTables
from npu_fp.io.source import open_model
from npu_fp.report.activation_report import write_activation_outputs

HF_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "bert",
]
RTOL = 1e-5


def ctx1() -> DistContext:
    return DistContext(0, 0, 1, resolve_device("cpu"))


def streamed(folder, ids: torch.Tensor, layers_per_block: int = 1):
    """Hidden states of every layer for batches ids [N, B, T], through the layer streamer."""
    source = open_model(folder)
    model = StreamModel(
        source.config, source.tensors, resolve_device("cpu"), torch.float32, 1 << 16
    )
    model.validate()
    got: dict[tuple[int, int], torch.Tensor] = {}
    tables = NormTables.zeros(ids.shape[0], model.num_layers, model.max_experts)
    streamer = LayerStreamer(
        model, tables, layers_per_block, capture=lambda b, i, h: got.__setitem__((b, i), h.clone())
    )
    hidden = [model.embed(ids[b]) for b in range(ids.shape[0])]
    streamer.run(hidden, list(range(ids.shape[0])), range(model.num_layers))
    model.close()
    return got, model


def norm_moments(xs: list[torch.Tensor]) -> tuple[float, float, int]:
    n = torch.cat([torch.linalg.vector_norm(x.double(), dim=-1).reshape(-1) for x in xs])
    return float(n.mean()), float(n.std(unbiased=False)), n.numel()


def check_rows(result: ActivationResult, ref_per_batch: list[dict], num_layers: int) -> None:
    by_key = {(r["layer"], r["stream"]): r for r in result.rows}
    assert len(by_key) == 3 * num_layers
    for layer in range(num_layers):
        for stream in ("residual", "attn", "mlp"):
            mean, std, n = norm_moments([ref[stream][layer] for ref in ref_per_batch])
            row = by_key[(layer, stream)]
            assert row["tokens"] == n and row["nan"] == 0 and row["inf"] == 0
            assert row["mean_norm"] == pytest.approx(mean, rel=RTOL)
            assert row["std_norm"] == pytest.approx(std, rel=1e-4, abs=1e-6)


def routing_counts(result: ActivationResult) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in result.routing:
        if r["expert"] is not None:
            out.setdefault(r["layer"], []).append(r["tokens"])
    return out


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_streamed_equals_transformers_forward(family, tmp_path):
    folder = tmp_path / family
    model = save_hf_model(family, folder, layers=3 if family == "deepseek_v3" else 2)
    cfg = ActivationsConfig(batch_size=2, seq_len=12, num_batches=3, seed=1, pass_batches=2)
    result = run_activations(ctx1(), cfg, str(folder), open_model(folder))
    batches = make_batches(folder, None, 2, 12, 3, 1, 128)
    refs = [reference_outputs(model, family, batches.ids[b]) for b in range(3)]
    num_layers = model.config.num_hidden_layers
    got, _ = streamed(folder, batches.ids)
    for b, ref in enumerate(refs):
        for layer in range(num_layers):
            torch.testing.assert_close(
                got[(b, layer)], ref["residual"][layer], rtol=RTOL, atol=1e-6
            )
    check_rows(result, refs, num_layers)
    if refs[0]["routing"]:
        want = {i: sum(ref["routing"][i] for ref in refs).tolist() for i in refs[0]["routing"]}
        assert routing_counts(result) == want
    else:
        assert result.routing == []
    assert result.settings["family"] == family


def test_layers_per_block_does_not_change_results(tmp_path):
    save_hf_model("qwen2_moe", tmp_path, layers=3)
    ids = make_batches(tmp_path, None, 2, 8, 2, 0, 128).ids
    one, _ = streamed(tmp_path, ids, layers_per_block=1)
    three, _ = streamed(tmp_path, ids, layers_per_block=3)
    assert one.keys() == three.keys()
    for k in one:
        assert torch.equal(one[k], three[k])


def test_pangu_streamed_equals_release_forward(tmp_path):
    cfg, tensors = save_pangu(tmp_path, layers=2)
    acfg = ActivationsConfig(batch_size=2, seq_len=12, num_batches=2, seed=0)
    result = run_activations(ctx1(), acfg, str(tmp_path), open_model(tmp_path))
    ids = make_batches(tmp_path, None, 2, 12, 2, 0, 128).ids
    refs = [pangu_reference(cfg, tensors, ids[b]) for b in range(2)]
    got, model = streamed(tmp_path, ids)
    assert model.family.name == "pangu_moe" and model.experts_per_group() == 2
    for b, ref in enumerate(refs):
        for layer in range(2):
            torch.testing.assert_close(
                got[(b, layer)], ref["residual"][layer], rtol=RTOL, atol=1e-5
            )
    check_rows(result, refs, 2)
    want = {i: sum(r["routing"][i] for r in refs).tolist() for i in range(2)}
    assert routing_counts(result) == want
    # MoGE: every token picks exactly one expert in every group, so groups are balanced
    tokens = 2 * 2 * 12
    groups = [r for r in result.routing if r["expert"] is None]
    assert len(groups) == 2 * 4 and all(r["tokens"] == tokens for r in groups)


def test_pangu_routing_matches_release_rule_on_random_inputs():
    torch.manual_seed(0)
    for experts, groups in ((8, 4), (64, 8), (12, 3)):
        conf = {**PANGU_CONFIG, "num_experts": experts, "num_experts_per_tok": groups}
        block = PanguMoGEBlock(build_hf_config(resolve_family(conf), conf)).eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(57, 32)
        with torch.no_grad():
            w, idx = block.route(x)
            want_w, want_idx = release_routing(block.gate(x), groups)
            assert torch.equal(idx, want_idx)
            torch.testing.assert_close(w, want_w, rtol=0, atol=0)
            size = experts // groups
            assert torch.equal(idx // size, torch.arange(groups).expand(57, groups))  # balance
            assert not torch.allclose(w.sum(-1), torch.ones(57))  # no renormalisation
            y = block(x[None])[0]
            scale = block.router_scale[0]
            for t in range(0, 57, 7):  # the block output, token by token, from the rule
                acc = block.shared_expert(x[t])
                for g in range(groups):
                    e = int(want_idx[t, g])
                    gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
                    h = torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])
                    acc = acc + (block.experts.down_proj[e] @ h) * want_w[t, g] * scale[e]
                torch.testing.assert_close(y[t], acc, rtol=1e-5, atol=1e-5)


def test_release_routing_ties_go_to_the_lower_expert():
    block = PanguMoGEBlock(build_hf_config(resolve_family(PANGU_CONFIG), PANGU_CONFIG))
    with torch.no_grad():
        block.gate.weight.zero_()  # all logits equal: every group ties
        _, idx = block.route(torch.randn(3, 32))
    assert idx.tolist() == [[0, 2, 4, 6]] * 3


def test_outputs_are_written(tmp_path):
    save_hf_model("mixtral", tmp_path / "m")
    cfg = ActivationsConfig(batch_size=1, seq_len=8, num_batches=2)
    result = run_activations(ctx1(), cfg, str(tmp_path / "m"), open_model(tmp_path / "m"))
    paths = write_activation_outputs(result, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == [
        "activations.csv",
        "activations.png",
        "activations_reads.json",
        "activations_routing.csv",
    ]
    reads = json.loads((tmp_path / "out" / "activations_reads.json").read_text())
    stored = sum(r.nbytes for n, r in open_model(tmp_path / "m").tensors.items() if ".layers." in n)
    # data mode, one pass: every layer read once, none kept resident
    assert reads["layer_bytes_read"] == [stored] and reads["resident"] == [False]
    with open(tmp_path / "out" / "activations.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "stream", "mean_norm", "std_norm", "tokens", "nan", "inf"]
    assert len(rows) == 6 and {r["stream"] for r in rows} == {"residual", "attn", "mlp"}
    assert all(math.isfinite(float(r["mean_norm"])) for r in rows)
    with open(tmp_path / "out" / "activations_routing.csv") as f:
        routing = list(csv.DictReader(f))
    assert list(routing[0]) == ["layer", "expert", "group", "tokens"]
    # top-2 of 4 experts: each layer routes 2 x tokens
    for layer in ("0", "1"):
        assert sum(int(r["tokens"]) for r in routing if r["layer"] == layer) == 2 * 16
    assert not list((tmp_path / "out").glob(".*tmp"))
    assert (tmp_path / "out" / "activations.png").stat().st_size > 1000


@pytest.mark.parametrize("budget", [1, 1 << 30, None])
def test_pipeline_keeps_layers_resident_only_within_its_budget(tmp_path, caplog, budget):
    """One rank in pipeline mode, 3 passes: a stage that fits is read once, one that does not
    streams once per pass with an INFO line naming the budget; the rows do not change."""
    save_hf_model("llama", tmp_path / "m", layers=3)
    src = open_model(tmp_path / "m")
    stored = sum(r.nbytes for n, r in src.tensors.items() if ".layers." in n)
    base = ActivationsConfig(batch_size=1, seq_len=8, num_batches=3, pass_batches=1)
    data_run = run_activations(ctx1(), base, str(tmp_path / "m"), src)
    cfg = replace(base, mode="pipeline", resident_bytes=budget)
    with caplog.at_level(logging.INFO, logger="npu_fp.activations"):
        res = run_activations(ctx1(), cfg, str(tmp_path / "m"), src)
    fits = budget != 1
    assert res.reads["resident"] == [fits]
    assert res.reads["layer_bytes_read"] == [stored if fits else 3 * stored]
    assert res.reads["layers_built"] == [3 if fits else 9]
    assert data_run.reads["layer_bytes_read"] == [3 * stored]
    assert res.rows == data_run.rows
    said = "stay resident" if fits else "exceed the resident budget"
    assert any(said in r.getMessage() for r in caplog.records), caplog.text


def test_free_memory_of_the_cpu_is_positive():
    assert free_memory_bytes(resolve_device("cpu")) > 0
