from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

REPO = Path(__file__).resolve().parents[1]

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
}


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dense Qwen2-style model and a MoGE model upcycled from it (bf16, HF layout)."""
    from npu_fp import zoo

    root = tmp_path_factory.mktemp("tiny")
    base = zoo.dense_tensors(TINY_SHAPE, seed=0)
    tok = zoo.tokenizer_json(TINY_SHAPE["vocab_size"])
    dense = zoo.write_checkpoint(root / "dense", base, zoo.qwen2_config(TINY_SHAPE), tokenizer=tok)
    moe, cfg = zoo.moge_upcycle(base, TINY_SHAPE, seed=1)
    moge = zoo.write_checkpoint(root / "moge", moe, cfg, tokenizer=tok)
    return {"dense": dense, "moge": moge}
