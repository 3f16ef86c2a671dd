"""Every preset composes into a validated RunConfig; bad values fail at conversion."""

from __future__ import annotations

import ast
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from npu_fp.config import (
    ActivationsConfig,
    ActivationsMode,
    DeviceChoice,
    RunConfig,
    register_configs,
    schema_keys,
    to_run_config,
)

CONF = REPO / "conf"
# conf/hydra/ configures Hydra itself (the help template), not the job
PRESETS = sorted(
    p.relative_to(CONF)
    for p in CONF.rglob("*.yaml")
    if p.parent != CONF and p.relative_to(CONF).parts[0] != "hydra"
)


def run_config(*overrides: str) -> RunConfig:
    """Compose and convert as the entry point does; `out_dir` stands in for Hydra's run folder
    (its `${hydra:runtime.output_dir}` resolves only inside a Hydra run)."""
    return to_run_config(compose("npu_fp", overrides=[*overrides, "out_dir=."]))


@pytest.fixture(autouse=True)
def hydra_ctx():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_preset_count() -> None:
    # the lesson of a config test that silently covered 3 of 197 files: count what is composed
    groups = {p.parts[0] for p in PRESETS}
    assert groups == {"model", "device", "activations"}
    assert len(PRESETS) == 13, PRESETS  # 7 model, 4 device, 2 activations presets


@pytest.mark.parametrize("preset", PRESETS, ids=str)
def test_every_preset_composes(preset: Path) -> None:
    group, name = preset.parts[0], preset.stem
    run = run_config(f"{group}={name}")
    assert isinstance(run, RunConfig)
    if group == "device":
        assert run.device == name
    if group == "model" and name != "demo":
        assert run.model.path and run.model.expect_arch and run.model.expect_layers


def test_pangu_preset_keeps_expert_groups_together() -> None:
    run = run_config("model=pangu_pro_moe")
    assert run.plan.expert_groups and run.model.expect_arch == "PanguProMoEForCausalLM"


def test_overrides_and_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPU_FP_MODELS", "/data/llm")
    run = run_config("model=qwen2_5_14b", "device=cpu", "plan.segment_bytes=8192")
    assert run.model.path == "/data/llm/Qwen2.5-14B" and run.plan.segment_bytes == 8192


@pytest.mark.parametrize(
    "override,message",
    [
        ("stats.chunk_elems=0", "chunk_elems must be > 0"),
        ("device=tpu", "Could not find 'device/tpu'"),  # a preset group: no such preset
        ("command=train", "Invalid value 'train', expected one of [demo, fingerprint"),
        ("activations.mode=tensor", "Invalid value 'tensor', expected one of [data, pipeline]"),
        ("activations.dtype=int8", "expected one of [float32, float16, bfloat16]"),
        ("plan.segment_bytes=10", "segment_bytes must be >= 4096"),
    ],
)
def test_bad_values_fail_early(override: str, message: str) -> None:
    with pytest.raises(Exception) as info:
        run_config(override)
    chain, e = [], info.value
    while e is not None:  # Hydra wraps OmegaConf's validation error
        chain.append(str(e))
        e = e.__cause__
    assert any(message in m for m in chain), chain


def test_choices_are_enums_and_plain_strings_are_checked() -> None:
    run = run_config("device=cpu", "activations.mode=pipeline")
    assert run.device is DeviceChoice.cpu and run.device == "cpu"
    assert (
        run.activations.mode is ActivationsMode.pipeline and str(run.activations.mode) == "pipeline"
    )
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, npu, got 'tpu'"):
        RunConfig(device="tpu", out_dir=".")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activations.dtype must be one of"):
        ActivationsConfig(dtype="int8")  # type: ignore[arg-type]


def test_configs_are_frozen() -> None:
    run = run_config()
    with pytest.raises(FrozenInstanceError):
        run.out_dir = "elsewhere"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        run.stats.chunk_elems = 1  # type: ignore[misc]


def test_out_dir_comes_from_the_schema() -> None:
    assert compose("npu_fp")._get_node("out_dir")._value() == "${hydra:runtime.output_dir}"
    with pytest.raises(ValueError, match="give an output folder"):
        RunConfig()


def test_compare_inputs_sit_under_compare() -> None:
    run = run_config("command=compare", "compare.models=[a,b]", "compare.signatures=[c.json]")
    assert run.compare.models == ["a", "b"] and run.compare.signatures == ["c.json"]
    with pytest.raises(Exception, match="models"):
        run_config("models=[a,b]")


def test_typo_fails_at_compose() -> None:
    with pytest.raises(Exception, match="segmnt_bytes"):
        compose("npu_fp", overrides=["plan.segmnt_bytes=1"])


def test_structured_config_round_trip() -> None:
    cfg = compose("npu_fp", overrides=["out_dir=."])
    assert OmegaConf.to_container(cfg, resolve=True)["command"] == "demo"


def attributes_read(root: Path) -> set[str]:
    """Attribute names read anywhere in the package outside config.py (x.name or getattr)."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.name == "config.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                names.add(str(node.args[1].value))
    return names


def test_every_schema_field_is_read_somewhere() -> None:
    keys = schema_keys()
    assert "stats.read_bytes" in keys and "compare.models" in keys and len(keys) > 40
    read = attributes_read(REPO / "npu_fp")
    unread = [k for k in keys if k.rsplit(".", 1)[-1] not in read]
    assert not unread, f"schema fields no code reads: {unread}"
    # the check sees a field that nothing reads
    assert "widen_on_host" not in read
