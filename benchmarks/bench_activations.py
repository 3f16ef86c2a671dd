"""Activation step vs a full transformers forward: tokens/s and peak memory on CPU (a benchmark).

    python benchmarks/bench_activations.py [--dir /tmp/npfp_bench_act] [--layers 16] [--hidden 512]

Writes a random Llama-architecture checkpoint (fp32) with a BPE tokenizer trained on the embedded
corpus, then runs each contender in its own process, with torch's default threads:

- `transformers full`: `AutoModelForCausalLM.from_pretrained` + a forward per batch (no norms);
- `streamed, 1 pass`: `run_activations` holding every batch's hidden states, so each layer is read
  once (norms of residual / attention / MLP for every layer recorded);
- `streamed, N passes`: `pass_batches=2`, so the layers are streamed once per 2 batches.

Time covers loading and the forward over the same token batches (corpus tokenization excluded for
both); peak RSS is the growth of the process's high-water mark after imports (`/proc/self/clear_refs`).
Prints a Markdown table.

    python benchmarks/bench_activations.py --ranks 2 [--layers 16 --hidden 640 --pass-batches 2]

With `--ranks N`, instead: `run_activations` under torchrun (gloo, N CPU ranks, one thread each) in
data mode, streaming pipeline (`resident_bytes=0`) and resident pipeline (automatic budget), and a
table of wall time (rank 0, around `run_activations`, tokenization included) and per-rank checkpoint
bytes read for layers, layer builds and most layer weight bytes held at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_model(folder: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from pydoc_data.topics import topics

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        list(topics.values()),
        trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]"], show_progress=False),
    )
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, folder: Path, batch: int, seq: int, batches: int) -> dict:
    """One contender, in this process; returns seconds and peak RSS growth in bytes."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers as tf  # noqa: F401  (imports are not measured)
    import transformers.masking_utils  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from npu_fp.activations import READ_BUFFER_BYTES, finish
    from npu_fp.device import resolve_device
    from npu_fp.dist import DistContext
    from npu_fp.forward.corpus import make_batches
    from npu_fp.forward.layers import StreamModel
    from npu_fp.forward.parallel import run_data
    from npu_fp.forward.stream import LayerStreamer, NormTables
    from npu_fp.io.source import open_model

    ids = make_batches(folder, None, batch, seq, batches, 0, None).ids  # warms the tokenizer too
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS:")
    t0 = time.perf_counter()
    if mode == "full":
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            for b in range(batches):
                model.model(ids[b])  # decoder stack only: the streamed run has no LM head either
    else:  # run_activations minus the corpus tokenization, done above for both contenders
        passes = batches if mode == "stream1" else 2
        src = open_model(folder)
        model = StreamModel(
            src.config, src.tensors, resolve_device("cpu"), torch.float32, READ_BUFFER_BYTES
        )
        model.validate()
        tables = NormTables.zeros(batches, model.num_layers, model.max_experts)
        streamer = LayerStreamer(model, tables, 1)
        run_data(DistContext(0, 0, 1, model.device), model, ids, streamer, passes)
        finish(tables, model.layer_experts, None, {})
        model.close()
        t_load = 0.0
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "load": t_load,
        "peak": _rss("VmHWM:") - base,
        "threads": torch.get_num_threads(),
    }


# --ranks runs: label -> (activations.mode, activations.resident_bytes)
DIST_RUNS = {
    "data mode": ("data", None),
    "pipeline, streaming": ("pipeline", 0),
    "pipeline, resident": ("pipeline", None),
}


def dist_child(run: str, folder: Path, a: argparse.Namespace) -> None:
    """One DIST_RUNS entry on this torchrun rank; rank 0 prints the seconds and the reads."""
    sys.path.insert(0, str(ROOT))
    from npu_fp.activations import run_activations
    from npu_fp.config import ActivationsConfig
    from npu_fp.dist import distributed
    from npu_fp.io.source import open_model

    mode, resident_bytes = DIST_RUNS[run]
    cfg = ActivationsConfig(
        batch_size=a.batch,
        seq_len=a.seq,
        num_batches=a.batches,
        mode=mode,
        pass_batches=a.pass_batches,
        resident_bytes=resident_bytes,
    )
    source = open_model(folder)
    with distributed("cpu") as ctx:
        t0 = time.perf_counter()
        result = run_activations(ctx, cfg, source.root, source)
        seconds = time.perf_counter() - t0
    if result is not None:
        print(json.dumps({"seconds": seconds, "reads": result.reads, "rows": result.rows}))


def dist_main(folder: Path, a: argparse.Namespace) -> None:
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, dict] = {}
    for _ in range(a.repeats):  # interleaved, best of N: the 2-core VM is noisy
        for run in DIST_RUNS:
            cmd = [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                f"--nproc_per_node={a.ranks}",
                __file__,
                *("--dist-child", run, "--dir", a.dir, "--layers", str(a.layers)),
                *("--hidden", str(a.hidden), "--batch", str(a.batch), "--seq", str(a.seq)),
                *("--batches", str(a.batches), "--pass-batches", str(a.pass_batches)),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if run not in results or r["seconds"] < results[run]["seconds"]:
                results[run] = r
    rows = {run: r.pop("rows") for run, r in results.items()}
    same = all(v == rows["data mode"] for v in rows.values())
    print(
        f"Llama {a.layers} layers x hidden {a.hidden} (fp32 weights {weights / 2**20:.1f} MiB), "
        f"{a.batches} batches x {a.batch} x {a.seq} tokens, pass_batches={a.pass_batches}, "
        f"{a.ranks} CPU ranks x 1 thread, best of {a.repeats}; norm rows identical: {same}\n"
    )
    print(
        "| run | time (s) | layer MiB read per rank | layer builds per rank "
        "| peak layer weights per rank (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for run, r in results.items():
        reads = r["reads"]

        def per_rank(key: str, scale: float = 1.0, reads: dict = reads) -> str:
            return " / ".join(f"{v / scale:,.1f}" if scale != 1 else f"{v:,}" for v in reads[key])

        print(
            f"| {run} | {r['seconds']:.2f} | {per_rank('layer_bytes_read', 2**20)} | "
            f"{per_rank('layers_built')} | {per_rank('peak_weight_bytes', 2**20)} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/npfp_bench_act")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None)
    ap.add_argument("--ranks", type=int, default=0, help="torchrun ranks: the pipeline table")
    ap.add_argument("--pass-batches", type=int, default=2)
    ap.add_argument("--dist-child", default=None)
    a = ap.parse_args()
    folder = Path(a.dir) / f"llama-{a.layers}x{a.hidden}"
    if a.child:
        print(json.dumps(child(a.child, folder, a.batch, a.seq, a.batches)))
        return
    if a.dist_child:
        dist_child(a.dist_child, folder, a)
        return
    write_model(folder, a.layers, a.hidden, a.vocab)
    if a.ranks:
        dist_main(folder, a)
        return
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tokens = a.batch * a.seq * a.batches
    labels = {
        "full": "transformers full forward",
        "stream1": "layer-streamed, 1 pass",
        "stream2": f"layer-streamed, {a.batches // 2} passes of 2 batches",
    }
    results: dict[str, dict] = {}
    for _ in range(a.repeats):  # interleaved, best of N: the 2-core VM is noisy
        for mode in labels:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--dir",
                    a.dir,
                    "--layers",
                    str(a.layers),
                    "--hidden",
                    str(a.hidden),
                    "--batch",
                    str(a.batch),
                    "--seq",
                    str(a.seq),
                    "--batches",
                    str(a.batches),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.get(mode)
            if best is None or r["seconds"] < best["seconds"]:
                results[mode] = {**r, "peak": min(r["peak"], best["peak"]) if best else r["peak"]}
            elif r["peak"] < best["peak"]:
                best["peak"] = r["peak"]
    full = results["full"]
    print(
        f"Llama {a.layers} layers x hidden {a.hidden} (fp32 weights {weights / 2**20:.1f} MiB), "
        f"{a.batches} batches x {a.batch} x {a.seq} = {tokens} tokens, CPU, "
        f"{full['threads']} threads, best of {a.repeats}\n"
    )
    print("| run | time (s) | tokens/s | vs full | peak RSS growth (MiB) | vs full |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, label in labels.items():
        r = results[mode]
        print(
            f"| {label} | {r['seconds']:.2f} | {tokens / r['seconds']:,.0f} | "
            f"{full['seconds'] / r['seconds']:.2f}x | {r['peak'] / 2**20:.1f} | "
            f"{r['peak'] / full['peak']:.2f}x |"
        )


if __name__ == "__main__":
    main()
