"""Every preset composes into a validated RunConfig; bad values fail at conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from npu_fp.config import RunConfig, register_configs, to_run_config

CONF = REPO / "conf"
PRESETS = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.parent != CONF)


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
    cfg = compose("npu_fp", overrides=[f"{group}={name}"])
    run = to_run_config(cfg)
    assert isinstance(run, RunConfig)
    if group == "device":
        assert run.device == name
    if group == "model" and name != "demo":
        assert run.model.path and run.model.expect_arch and run.model.expect_layers


def test_pangu_preset_keeps_expert_groups_together() -> None:
    run = to_run_config(compose("npu_fp", overrides=["model=pangu_pro_moe"]))
    assert run.plan.expert_groups and run.model.expect_arch == "PanguProMoEForCausalLM"


def test_overrides_and_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPU_FP_MODELS", "/data/llm")
    run = to_run_config(
        compose("npu_fp", overrides=["model=qwen2_5_14b", "device=cpu", "plan.segment_bytes=8192"])
    )
    assert run.model.path == "/data/llm/Qwen2.5-14B" and run.plan.segment_bytes == 8192


@pytest.mark.parametrize(
    "override,message",
    [
        ("stats.chunk_elems=0", "chunk_elems must be > 0"),
        ("device=tpu", None),
        ("command=train", "command must be one of"),
        ("plan.segment_bytes=10", "segment_bytes must be >= 4096"),
    ],
)
def test_bad_values_fail_early(override: str, message: str | None) -> None:
    with pytest.raises(Exception) as info:
        to_run_config(compose("npu_fp", overrides=[override]))
    if message:
        assert message in str(info.value)


def test_typo_fails_at_compose() -> None:
    with pytest.raises(Exception, match="segmnt_bytes"):
        compose("npu_fp", overrides=["plan.segmnt_bytes=1"])


def test_structured_config_round_trip() -> None:
    cfg = compose("npu_fp")
    assert OmegaConf.to_container(cfg, resolve=True)["command"] == "fingerprint"
