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
"""

from __future__ import annotations

import argparse
import json
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
    a = ap.parse_args()
    folder = Path(a.dir) / f"llama-{a.layers}x{a.hidden}"
    if a.child:
        print(json.dumps(child(a.child, folder, a.batch, a.seq, a.batches)))
        return
    write_model(folder, a.layers, a.hidden, a.vocab)
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
