"""The activation step: per-layer norms of the residual stream, attention and MLP outputs.

`npu-fp activations model.path=DIR` (npu_fp.commands; also the fingerprint job when `activations.enabled=true`) runs
corpus text through the model layer by layer (npu_fp.forward) and records, for every layer, the mean
and spread over tokens of the L2 norm of the layer's output (`residual`), of its attention branch
(`attn`) and of its MLP / MoE branch (`mlp`), plus for MoE layers the tokens routed to each expert
and each expert group. All inputs are checked, on every rank, before any device work starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from npu_fp.config import ActivationsConfig
from npu_fp.device import free_memory_bytes
from npu_fp.dist import DistContext, main_raises_everywhere, ranks_on_host, reduce_rows_to_main
from npu_fp.forward.corpus import make_batches
from npu_fp.forward.errors import (
    ActivationInputError,
    SequenceLengthError,
    UnsupportedArchitectureError,
)
from npu_fp.forward.layers import StreamModel
from npu_fp.forward.parallel import pipeline_stages, reduce_tables, run_data, run_pipeline
from npu_fp.forward.stream import STREAMS, LayerStreamer, NormTables
from npu_fp.io.source import ModelSource

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
READ_BUFFER_BYTES = 32 << 20
ROW_FIELDS = ("layer", "stream", "mean_norm", "std_norm", "tokens", "nan", "inf")
ROUTING_FIELDS = ("layer", "expert", "group", "tokens")


@dataclass(frozen=True)
class ActivationResult:
    # one row per (layer, stream): mean / std over the finite per-token norms; `tokens` counts all
    # tokens seen, `nan` and `inf` those whose norm was not finite (excluded from mean and std)
    rows: list[dict]
    # one row per (MoE layer, expert), then one per (layer, group) with expert None
    routing: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # per rank (lists indexed by rank): whether its layers stayed resident, checkpoint bytes read
    # to build layers and in all (embeddings included), layer builds, most layer weight bytes alive
    # at once; they depend on ranks and budget, so they stay out of `settings` (signatures compare)
    reads: dict = field(default_factory=dict)


def compute_dtype(cfg: ActivationsConfig, ctx: DistContext) -> torch.dtype:
    if cfg.dtype == "bfloat16" and not ctx.device.supports_bf16:
        raise ActivationInputError(
            f"activations.dtype=bfloat16, but {ctx.device.name} has no bf16 kernels; set "
            "activations.dtype=float16 or float32 (weights are widened on the host)"
        )
    return DTYPES[cfg.dtype]


def run_activations(
    ctx: DistContext, cfg: ActivationsConfig, model_root: str, source: ModelSource
) -> ActivationResult | None:
    """Collective over all ranks; rank 0 gets the result, the others None."""
    if importlib.util.find_spec("transformers") is None:
        raise ActivationInputError(
            "the activations step reuses transformers' layer modules: install them with "
            "pip install 'npu_fp[forward]' (transformers>=5, after torch is pinned)"
        )
    if source.tokens is not None:  # a GGUF file: llama.cpp names, no tokenizer.json
        raise UnsupportedArchitectureError(
            f"{source.root}: the activations step runs Hugging Face layouts; a GGUF model is "
            "fingerprinted and compared, not run (use its safetensors original)"
        )
    where = str(Path(source.root) / "config.json")
    model = StreamModel(
        source.config, source.tensors, ctx.device, compute_dtype(cfg, ctx), READ_BUFFER_BYTES, where
    )
    try:
        positions = model.max_positions()
        if positions is not None and cfg.seq_len > positions:
            raise SequenceLengthError(
                f"activations.seq_len={cfg.seq_len} exceeds max_position_embeddings={positions} "
                f"in {where}; use activations.seq_len<={positions}"
            )
        batches = make_batches(
            model_root,
            cfg.corpus,
            cfg.batch_size,
            cfg.seq_len,
            cfg.num_batches,
            cfg.seed,
            getattr(model.hf_config, "vocab_size", None),
        )
        model.validate()
        stages = (
            pipeline_stages([model.layer_bytes(i) for i in range(model.num_layers)], ctx.world_size)
            if cfg.mode == "pipeline"
            else []
        )
        tables = NormTables.zeros(batches.num_batches, model.num_layers, model.max_experts)
        keep_all = cfg.mode == "pipeline" and fits_resident(
            ctx, cfg, model, stages[ctx.rank], batches.num_batches
        )
        streamer = LayerStreamer(model, tables, cfg.layers_per_block, keep_all=keep_all)
        error: BaseException | None = None
        try:
            if cfg.mode == "pipeline" and ctx.world_size > 1:
                run_pipeline(ctx, model, batches.ids, streamer, cfg.pass_batches, stages)
            else:
                run_data(ctx, model, batches.ids, streamer, cfg.pass_batches)
        except (OSError, RuntimeError, ValueError) as e:
            log.error("rank %d failed in the activation forward: %s", ctx.rank, e)
            error = e
        main_raises_everywhere(ctx, error)
        tables = reduce_tables(ctx, tables)
        log.info(
            "rank %d: %d layer builds, %d checkpoint bytes read for layers (%d in all), peak "
            "%.1f MiB of layer weights, %.1f MiB of hidden states",
            ctx.rank,
            streamer.layers_built,
            streamer.layer_bytes_read,
            model.reader.bytes_read,
            streamer.peak_weight_bytes / 2**20,
            streamer.peak_hidden_bytes / 2**20,
        )
        reads = gather_reads(ctx, streamer, model.reader.bytes_read)
    finally:
        model.close()
    if not ctx.is_main:
        return None
    settings = {
        "corpus": batches.description,
        "corpus_sha256": batches.corpus_sha256,
        "tokens_sha256": batches.tokens_sha256,
        "tokenizer_sha256": batches.tokenizer_sha256,
        "corpus_tokens": batches.corpus_tokens,
        "repeated_windows": batches.repeated_windows,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "num_batches": cfg.num_batches,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "mode": cfg.mode,
        "family": model.family.name,
        "num_layers": model.num_layers,
    }
    result = finish(tables, model.layer_experts, model.experts_per_group(), settings)
    return replace(result, reads=reads)


def fits_resident(
    ctx: DistContext, cfg: ActivationsConfig, model: StreamModel, stage: range, num_batches: int
) -> bool:
    """Pipeline mode: keep this rank's stage on its device when it fits the budget and when there
    is more than one pass (one pass reads every layer once anyway)."""
    need = sum(model.resident_bytes(i) for i in stage)
    if cfg.resident_bytes is not None:
        budget, rule = cfg.resident_bytes, "activations.resident_bytes"
    else:
        sharing = 1 if ctx.device.type != "cpu" else ranks_on_host(ctx)
        budget = free_memory_bytes(ctx.device) // (2 * sharing)
        rule = f"half the free memory of {ctx.device.name}" + (
            f" shared by {sharing} ranks" if sharing > 1 else ""
        )
    passes = math.ceil(num_batches / cfg.pass_batches)
    if passes == 1:
        log.info("rank %d: one pass: layers are streamed (each is read once anyway)", ctx.rank)
        return False
    if need > budget:
        log.info(
            "rank %d: layers %d-%d stream once per pass (%d passes): %.1f MiB of weights exceed "
            "the resident budget of %.1f MiB (%s)",
            ctx.rank,
            stage.start,
            stage.stop - 1,
            passes,
            need / 2**20,
            budget / 2**20,
            rule,
        )
        return False
    log.info(
        "rank %d: layers %d-%d stay resident (%.1f MiB of a %.1f MiB budget, %s): the checkpoint "
        "is read once for %d passes",
        ctx.rank,
        stage.start,
        stage.stop - 1,
        need / 2**20,
        budget / 2**20,
        rule,
        passes,
    )
    return True


READ_FIELDS = ("resident", "layer_bytes_read", "bytes_read", "layers_built", "peak_weight_bytes")


def gather_reads(ctx: DistContext, streamer: LayerStreamer, bytes_read: int) -> dict:
    """Each rank's read counters, one row per rank summed onto rank 0 (collective)."""
    table = torch.zeros(ctx.world_size, len(READ_FIELDS), dtype=torch.int64)
    table[ctx.rank] = torch.tensor(
        [
            int(streamer.keep_all),
            streamer.layer_bytes_read,
            bytes_read,
            streamer.layers_built,
            streamer.peak_weight_bytes,
        ]
    )
    table = reduce_rows_to_main(ctx, table)
    reads = {k: table[:, j].tolist() for j, k in enumerate(READ_FIELDS)}
    reads["resident"] = [bool(v) for v in reads["resident"]]
    return reads


def finish(
    tables: NormTables, layer_experts: dict[int, int], group_size: int | None, settings: dict
) -> ActivationResult:
    """Rows from the summed tables (rank 0)."""
    totals = tables.totals()
    rows = []
    for layer in range(totals.shape[0]):
        for s, stream in enumerate(STREAMS):
            count, total, sumsq, nan, inf = (float(v) for v in totals[layer, s])
            finite = count - nan - inf
            # no finite token: None, not NaN (signatures are strict JSON)
            mean = total / finite if finite else None
            std = math.sqrt(max(sumsq / finite - mean * mean, 0.0)) if mean is not None else None
            rows.append(
                {
                    "layer": layer,
                    "stream": stream,
                    "mean_norm": mean,
                    "std_norm": std,
                    "tokens": int(count),
                    "nan": int(nan),
                    "inf": int(inf),
                }
            )
            if nan or inf:
                log.warning(
                    "layer %d %s: %d NaN and %d Inf token norms (left out of mean/std)",
                    layer,
                    stream,
                    int(nan),
                    int(inf),
                )
    routing: list[dict] = []
    for layer, n_exp in sorted(layer_experts.items()):
        if not n_exp:
            continue
        counts = tables.routing[layer, :n_exp].tolist()
        groups: dict[int, int] = {}
        for e, c in enumerate(counts):
            g = e // group_size if group_size else None
            routing.append({"layer": layer, "expert": e, "group": g, "tokens": int(c)})
            if g is not None:
                groups[g] = groups.get(g, 0) + int(c)
        routing += [
            {"layer": layer, "expert": None, "group": g, "tokens": c}
            for g, c in sorted(groups.items())
        ]
    return ActivationResult(rows, routing, settings)
