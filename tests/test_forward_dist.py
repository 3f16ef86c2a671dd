"""Activation step across real torchrun ranks (gloo, free rendezvous port), and host memory.

1, 2 and 3 ranks, data-parallel and pipeline, must give bit-identical rows: every (batch, layer,
stream) slot of the statistics table is filled by exactly one rank, the per-slot sums come from the
same fp32 norms (numpy's float64 pairwise sum), the cross-rank sum adds zeros only, and rank 0 adds
the batch slots in batch order. Every rank runs single-threaded under torchrun (OMP_NUM_THREADS=1),
so the forward itself is the same computation whatever the number of ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from forward_helpers import save_pangu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def torchrun(nproc: int, model: Path, out: Path, runs: str = "data,pipeline") -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / "forward_helpers.py"),
        str(model),
        str(out),
        runs,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ranks_and_modes_give_identical_norms(tmp_path):
    import torch
    from forward_helpers import activation_runs

    from npu_fp.device import resolve_device
    from npu_fp.dist import DistContext

    model = tmp_path / "pangu"
    save_pangu(model, layers=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what every torchrun rank runs with
    try:  # one rank in this process: no process group, the torchrun start-up saved
        single = activation_runs(DistContext(0, 0, 1, resolve_device("cpu")), str(model))
    finally:
        torch.set_num_threads(threads)
    runs = {1: json.loads(json.dumps(single))}
    runs.update({n: torchrun(n, model, tmp_path / f"out{n}.json") for n in (2, 3)})
    base = runs[1]["data"]
    assert len(base["rows"]) == 9 and base["routing"]
    assert all(r["tokens"] == 5 * 2 * 16 for r in base["rows"])
    for n, res in runs.items():
        for mode in ("data", "pipeline"):
            assert res[mode]["rows"] == base["rows"], (n, mode)
            assert res[mode]["routing"] == base["routing"], (n, mode)
            assert res[mode]["settings"]["tokens_sha256"] == base["settings"]["tokens_sha256"]


def _layer_bytes(model: Path, layers: int) -> list[int]:
    """Stored bytes of each layer's tensors, from the safetensors header (not npu_fp's reader)."""
    from safetensors import safe_open

    sizes = [0] * layers
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.startswith("model.layers."):
                t = f.get_tensor(name)
                sizes[int(name.split(".")[2])] += t.numel() * t.element_size()
    return sizes


def test_resident_pipeline_reads_each_layer_once(tmp_path):
    """2 ranks, 4 layers, 3 passes: resident stages read their bytes once, streaming ones 3 times,
    and all three runs give bit-identical norms and routing."""
    from npu_fp.forward.parallel import pipeline_stages

    model = tmp_path / "pangu"
    save_pangu(model, layers=4)
    res = torchrun(2, model, tmp_path / "out.json", "data,pipeline,pipeline_stream")
    sizes = _layer_bytes(model, 4)
    stages = pipeline_stages(sizes, 2)
    assert [len(s) for s in stages] == [2, 2]  # several blocks per stage: streaming re-reads
    stage_bytes = [sum(sizes[i] for i in s) for s in stages]
    passes = 3  # 5 batches, 2 per pass
    resident, stream, data = res["pipeline"], res["pipeline_stream"], res["data"]
    assert resident["reads"]["resident"] == [True, True]
    assert resident["reads"]["layer_bytes_read"] == stage_bytes
    assert resident["reads"]["layers_built"] == [2, 2]
    assert stream["reads"]["resident"] == [False, False]
    assert stream["reads"]["layer_bytes_read"] == [passes * b for b in stage_bytes]
    # data mode: rank 0 has batches 0, 2, 4 (2 passes), rank 1 batches 1, 3 (1 pass)
    assert data["reads"]["layer_bytes_read"] == [2 * sum(sizes), sum(sizes)]
    assert resident["rows"] == data["rows"] == stream["rows"]
    assert resident["routing"] == data["routing"] == stream["routing"]
    assert all(r["tokens"] == 5 * 2 * 16 for r in resident["rows"])


PEAK_SCRIPT = r"""
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[3], sys.argv[4]]
import torch
mode, folder = sys.argv[1], Path(sys.argv[2])
if mode == "full":
    import transformers as tf
else:
    from npu_fp.activations import run_activations
    from npu_fp.config import ActivationsConfig
    from npu_fp.device import resolve_device
    from npu_fp.dist import DistContext
    from npu_fp.io.source import open_model
    from npu_fp.forward.layers import _layer_factory, build_hf_config, resolve_family
    import transformers.masking_utils
    src = open_model(folder)
    fam = resolve_family(src.config)  # imports done before measuring
    build_hf_config(fam, src.config), _layer_factory(fam)


def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: imports are not counted
base = rss("VmRSS:")
if mode == "full":
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 16)))
else:
    run_activations(DistContext(0, 0, 1, resolve_device("cpu")),
                    ActivationsConfig(batch_size=2, seq_len=16, num_batches=1), str(folder), src)
print(rss("VmHWM:") - base)
"""


def _write_wide(folder: Path, layers: int) -> None:
    """A Llama with 8 MiB of fp32 weights per layer, written straight as safetensors."""
    import torch
    from forward_helpers import make_tokenizer, tiny_config
    from safetensors.torch import save_file

    cfg = tiny_config("llama", layers)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 512, 1024, 8
    cfg.num_key_value_heads, cfg.head_dim = 8, 64
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(128, 512, generator=g),
        "model.norm.weight": torch.ones(512),
        "lm_head.weight": torch.randn(128, 512, generator=g),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = torch.randn(512, 512, generator=g) * 0.02
        for n, shape in (("gate", (1024, 512)), ("up", (1024, 512)), ("down", (512, 1024))):
            t[p + f"mlp.{n}_proj.weight"] = torch.randn(*shape, generator=g) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(512)
        t[p + "post_attention_layernorm.weight"] = torch.ones(512)
    folder.mkdir(parents=True)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    make_tokenizer(folder)


def _peak(mode: str, folder: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode, str(folder), str(ROOT), str(HERE)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_host_memory_is_bounded_as_depth_grows(tmp_path):
    """Peak RSS of the streamed run (imports excluded) for 2 and 10 layers of 8 MiB each.

    A full forward holds every layer (the benchmark measures it: about depth x 8 MiB); the streamed
    run holds one layer plus activations, so 8 more layers (64 MiB) must not show up.
    """
    layer_bytes = 8 << 20
    for depth in (2, 10):
        _write_wide(tmp_path / f"d{depth}", depth)
    streamed = {d: _peak("streamed", tmp_path / f"d{d}") for d in (2, 10)}
    assert streamed[2] < 8 * layer_bytes, streamed
    assert streamed[10] - streamed[2] < layer_bytes, streamed
