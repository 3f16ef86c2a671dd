"""The fingerprint job end to end: in-process, under real torchrun/gloo ranks, and the launcher."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import save_file

from npu_fp.commands import demo, fingerprint
from npu_fp.config import ModelConfig, PlanConfig, RunConfig, StatsConfig
from npu_fp.signature import SignatureError, load_signature

SMALL = [
    "plan.segment_bytes=4096",
    "stats.read_bytes=4096",
    "stats.chunk_elems=1000",
    "progress=false",
]


def small_cfg(model: Path, out: Path, **kw) -> RunConfig:
    return RunConfig(
        model=ModelConfig(path=str(model)),
        out_dir=str(out),
        progress=False,
        plan=PlanConfig(segment_bytes=4096, **kw),
        stats=StatsConfig(read_bytes=4096, chunk_elems=1000),
    )


def test_in_process_outputs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    [sig_path] = fingerprint(small_cfg(tiny_models["moge"], tmp_path))
    sig = load_signature(sig_path)
    assert sig.identity["adapter"] and sig.num_layers == 3
    assert sig.identity["num_experts"] == 16 and sig.identity["experts_per_group"] == 2
    assert not sig.doc["unmapped"]
    with open(tmp_path / "tensors.csv") as f:
        rows = list(csv.DictReader(f))
    for col in (
        "name",
        "layer",
        "role",
        "expert",
        "group",
        "part",
        "dtype",
        "numel",
        "mean",
        "std",
        "rms",
        "absmax",
        "max",
    ):
        assert col in rows[0]
    assert len(rows) == len(sig.tensors)
    assert (tmp_path / "profile.png").stat().st_size > 1000
    # the expert aggregate per layer and per MoGE group
    layer0 = [r for r in sig.layers if r["layer"] == 0 and r["role"] == "moe.expert.up"]
    assert len(layer0) == 1 + 8 and {r["group"] for r in layer0} == {None, *range(8)}
    pooled = next(r for r in layer0 if r["group"] is None)
    assert pooled["tensors"] == 16 and pooled["expert_std_spread"] >= 0
    assert any(r["role"] == "moe.router_scale" for r in sig.layers)
    # stats against a direct float64 computation for one tensor
    from safetensors.torch import load_file

    t = load_file(str(tiny_models["moge"] / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    x = t[name].double()
    row = next(r for r in sig.tensors if r["name"] == name)
    assert row["std"] == pytest.approx(x.std().item(), rel=1e-9)
    assert row["absmax"] == pytest.approx(x.abs().max().item(), rel=0)


def test_fingerprint_leaves_the_thread_count_alone(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The kernel runs single-threaded, but only inside its own scope: compare's matmuls after an
    in-process fingerprint keep the caller's thread count."""
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    torch.set_num_threads(wanted)
    try:
        fingerprint(small_cfg(tiny_models["dense"], tmp_path))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_content_hash_finds_identical_tensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from conftest import TINY_SHAPE

    from npu_fp import zoo

    base = zoo.dense_tensors(TINY_SHAPE, seed=0)
    changed = "model.layers.1.mlp.up_proj.weight"
    base[changed] = base[changed] * 1.001
    other = zoo.write_checkpoint(tmp_path / "edited", base, zoo.qwen2_config(TINY_SHAPE))
    a = load_signature(fingerprint(small_cfg(tiny_models["dense"], tmp_path / "a"))[0])
    b = load_signature(fingerprint(small_cfg(other, tmp_path / "b"))[0])
    ha = {r["name"]: r["hash"] for r in a.tensors if not r["part"]}
    hb = {r["name"]: r["hash"] for r in b.tensors if not r["part"]}
    assert ha.keys() == hb.keys()
    assert [n for n in ha if ha[n] != hb[n]] == [changed]
    assert a.identity["content_hash"] != b.identity["content_hash"]


def test_nan_inf_reported_not_fatal(tmp_path: Path) -> None:
    d = tmp_path / "nanmodel"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
        )
    )
    w = torch.randn(8, 8)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    save_file({"model.layers.0.self_attn.q_proj.weight": w}, str(d / "model.safetensors"))
    sig = load_signature(fingerprint(small_cfg(d, tmp_path / "out"))[0])
    [row] = sig.tensors
    assert row["nan"] == 1 and row["inf"] == 1 and row["numel"] == 64
    finite = w[torch.isfinite(w)].double()
    assert row["std"] == pytest.approx(finite.std().item(), rel=1e-9)


def test_corrupted_signature_detected(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    p = fingerprint(small_cfg(tiny_models["dense"], tmp_path))[0]
    doc = json.loads(p.read_text())
    doc["tensors"][0]["std"] = 0.5
    p.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="corrupted"):
        load_signature(p)
    doc["schema_version"] = 0
    p.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="schema 0"):
        load_signature(p)


@pytest.mark.slow
def test_cli_bad_input_exits_nonzero_without_partial_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope}")
    out = tmp_path / "out"
    r = run_cli(
        ["-m", "npu_fp", "fingerprint", f"model.path={bad}", f"hydra.run.dir={out}"], cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "model.safetensors" in r.stderr and "error" in r.stderr
    assert not (out / "signature.json").exists() and not (out / "tensors.csv").exists()


@pytest.mark.slow
def test_dry_run_prints_plan(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "fingerprint",
            f"model.path={tiny_models['moge']}",
            "dry_run=true",
            "world_size=8",
            "plan.expert_groups=true",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "rank 7:" in r.stdout and "expert groups" in r.stdout
    assert not (tmp_path / "signature.json").exists()


def torchrun(n: int, model: Path, out: Path, *extra: str):
    return run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "npu_fp",
            "fingerprint",
            f"model.path={model}",
            f"hydra.run.dir={out}",
            *SMALL,
            *extra,
        ],
        cwd=out.parent,
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moge"])
def test_signatures_identical_for_1_2_3_ranks(
    tiny_models: dict[str, Path], tmp_path: Path, model: str
) -> None:
    extra = ["plan.expert_groups=true"] if model == "moge" else []
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"r{n}"
        r = torchrun(n, tiny_models[model], out, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
        assert (out / "logs" / f"rank{n - 1}.log").exists()  # per-rank logs
    ref = (outs[0] / "signature.json").read_bytes()
    for out in outs[1:]:
        assert (out / "signature.json").read_bytes() == ref
        assert (out / "tensors.csv").read_bytes() == (outs[0] / "tensors.csv").read_bytes()


@pytest.mark.slow
def test_launcher_with_two_cpu_ranks(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {
        "NPROC": "2",
        "RUN_DIR": str(out),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    import subprocess

    r = subprocess.run(
        [
            str(REPO / "launch" / "run.sh"),
            "fingerprint",
            f"model.path={tiny_models['dense']}",
            *SMALL,
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_signature(out / "signature.json").num_layers == 3
    assert (out / "logs" / "rank1.log").exists()


@pytest.mark.slow
def test_torchrun_without_run_dir_shares_one_directory(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    r = run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "npu_fp",
            "fingerprint",
            f"model.path={tiny_models['dense']}",
            *SMALL,
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    [run_dir] = list((tmp_path / "outputs" / "torchrun").iterdir())
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    assert (run_dir / "signature.json").is_file()


@pytest.mark.slow
def test_multirun_over_models(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    models = f"{tiny_models['dense']},{tiny_models['moge']}"
    r = run_cli(
        [
            "-m",
            "npu_fp",
            "--multirun",
            "fingerprint",
            f"model.path={models}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *SMALL,
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = {load_signature(tmp_path / "sweep" / str(i)).identity["architecture"] for i in (0, 1)}
    assert names == {"Qwen2ForCausalLM", "PanguProMoEForCausalLM"}


def test_fp8_weights_are_dequantized_before_statistics(tmp_path: Path) -> None:
    d = tmp_path / "fp8"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 1,
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "weight_block_size": [128, 128],
                },
            }
        )
    )
    q = (torch.randn(300, 200) * 0.5).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2) * 0.01 + 0.001
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": q,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
        },
        str(d / "model.safetensors"),
    )
    sig = load_signature(fingerprint(small_cfg(d, tmp_path / "out"))[0])
    [row] = sig.tensors
    # dequantized in float32 (as DeepSeek's own kernels do), statistics in float64
    s32 = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    w = (q.float() * s32).double()
    assert row["std"] == pytest.approx(w.std().item(), rel=1e-9)
    assert row["dtype"] == "F8_E4M3" and sig.doc["skipped"] == [
        "model.layers.0.mlp.up_proj.weight_scale_inv"
    ]


def test_preset_expectations_catch_a_wrong_path(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cfg = small_cfg(tiny_models["dense"], tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, expect_arch="PanguProMoEForCausalLM"))
    with pytest.raises(ValueError, match="preset expects architecture 'PanguProMoEForCausalLM'"):
        fingerprint(cfg)
    cfg = replace(cfg, model=replace(cfg.model, expect_arch=None, expect_layers=48))
    with pytest.raises(ValueError, match="preset expects 48 layers"):
        fingerprint(cfg)
    assert not (tmp_path / "signature.json").exists()


@pytest.mark.slow
def test_demo_builds_the_zoo_and_ends_with_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = RunConfig(out_dir=str(tmp_path / "out"), zoo_dir=str(tmp_path / "zoo"), progress=False)
    written = demo(cfg)
    assert [p.parent.name for p in written] == [
        "base",
        "base-continued",
        "moge-upcycled",
        "independent",
    ]
    report = json.loads((tmp_path / "out" / "compare" / "report.json").read_text())
    verdicts = {(p["a"], p["b"]): p["verdict"] for p in report["pairs"]}
    assert verdicts[("base", "base-continued")] == "related"
    assert verdicts[("base", "moge-upcycled")] == "related"
    assert verdicts[("base", "independent")] == "independent"
    # the seed statistic alone would have called the independent model a derivative
    indep = next(p for p in report["pairs"] if p["b"] == "independent" and p["a"] == "base")
    assert indep["honestagi_score"] > 0.95
    assert "base vs independent: independent" in capsys.readouterr().out


@pytest.mark.slow
def test_activations_inside_fingerprint_do_not_depend_on_ranks(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    docs = []
    for n in (1, 2):
        out = tmp_path / f"act{n}"
        r = torchrun(
            n, tiny_models["moge"], out, "activations.enabled=true", "activations.num_batches=3"
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "activations.csv").is_file() and (out / "activations_routing.csv").is_file()
        docs.append(json.loads((out / "signature.json").read_text()))
    assert docs[0]["activations"]["rows"] == docs[1]["activations"]["rows"]
    assert docs[0]["activations"]["routing"] == docs[1]["activations"]["routing"]
    assert {r["stream"] for r in docs[0]["activations"]["rows"]} == {"residual", "attn", "mlp"}


def test_no_command_with_a_model_fingerprints_it(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """`npu-fp model.path=DIR` (the default command, demo, given a model) fingerprints DIR and
    compares nothing, as before demo was a command of its own."""
    cfg = replace(small_cfg(tiny_models["dense"], tmp_path), command="demo")
    assert demo(cfg) == [tmp_path / "signature.json"]
    assert not (tmp_path / "compare").exists()
