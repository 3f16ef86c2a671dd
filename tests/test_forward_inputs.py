"""Activation step: corpus and batching, bad inputs (named errors before device work), NaN/Inf
reporting, pipeline plans and bounded memory as depth grows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from forward_helpers import make_tokenizer, save_hf_model, save_pangu
from safetensors.torch import load_file, save_file

from npu_fp.activations import run_activations
from npu_fp.commands import activations
from npu_fp.config import ActivationsConfig, ModelConfig, RunConfig
from npu_fp.device import resolve_device
from npu_fp.dist import DistContext
from npu_fp.forward import (
    ActivationInputError,
    CorpusError,
    SequenceLengthError,
    TokenizerError,
    TokenizerMissingError,
    UnsupportedArchitectureError,
    WeightLayoutError,
)
from npu_fp.forward.corpus import EMBEDDED, iter_documents, make_batches
from npu_fp.forward.parallel import assign_batches, pipeline_stages
from npu_fp.forward.stream import LayerStreamer
from npu_fp.io.source import open_model

CTX = DistContext(0, 0, 1, resolve_device("cpu"))
SMALL = ActivationsConfig(batch_size=1, seq_len=8, num_batches=2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", folder)
    return folder


@pytest.fixture
def no_device_work(monkeypatch):
    """Fail the test if anything reaches the layer streamer."""

    def boom(*_a, **_k):
        raise AssertionError("device work started before the input was checked")

    monkeypatch.setattr(LayerStreamer, "run", boom)


def run(folder, cfg=SMALL, ctx=CTX):
    return run_activations(ctx, cfg, str(folder), open_model(folder))


# -- corpus ---------------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_seeded(llama):
    a = make_batches(llama, None, 2, 16, 3, 0, 128)
    b = make_batches(llama, None, 2, 16, 3, 0, 128)
    c = make_batches(llama, None, 2, 16, 3, 1, 128)
    assert a.ids.shape == (3, 2, 16) and a.description == EMBEDDED
    assert torch.equal(a.ids, b.ids) and a.tokens_sha256 == b.tokens_sha256
    assert not torch.equal(a.ids, c.ids) and a.corpus_sha256 == c.corpus_sha256
    assert not a.repeated_windows


def test_text_jsonl_and_folder_corpora(llama, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the quick brown fox\n" * 50)
    (tmp_path / "c" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": "jumps over the lazy dog"}) for _ in range(40)) + "\n\n"
    )
    (tmp_path / "c" / "skip.bin").write_bytes(b"\xff\xfe")  # not a corpus suffix: ignored
    desc, docs = iter_documents(str(tmp_path / "c"))
    docs = list(docs)
    assert desc == str((tmp_path / "c").resolve()) and len(docs) == 41
    batches = make_batches(llama, str(tmp_path / "c"), 2, 8, 2, 0, 128)
    assert batches.ids.shape == (2, 2, 8)
    single = make_batches(llama, str(tmp_path / "c" / "b.jsonl"), 1, 4, 2, 0, 128)
    assert single.ids.shape == (2, 1, 4)


def test_short_corpus_reuses_windows_with_a_warning(llama, tmp_path, caplog):
    (tmp_path / "s.txt").write_text("the quick brown fox jumps over the lazy dog " * 3)
    b = make_batches(llama, str(tmp_path / "s.txt"), 4, 8, 4, 0, 128)
    assert b.repeated_windows and b.ids.shape == (4, 4, 8)
    assert "reused" in caplog.text


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "no text"),
        (b"  \n\n\t", "no text"),
        (b"ok \xff\xfe bad", "not UTF-8"),
        (b"fox", "fewer than one sequence"),
    ],
)
def test_bad_text_corpus(llama, tmp_path, content, what, no_device_work):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=what) as e:
        run(llama, replace(SMALL, corpus=str(tmp_path / "c.txt")))
    assert "c.txt" in str(e.value)


@pytest.mark.parametrize(
    "line, what",
    [
        ('{"text": "ok"}\n{not json', r"c\.jsonl:2: invalid JSON"),
        ('{"content": "no text key"}', r'c\.jsonl:1: expected an object with a "text" string'),
    ],
)
def test_bad_jsonl_corpus(llama, tmp_path, line, what, no_device_work):
    (tmp_path / "c.jsonl").write_text(line)
    with pytest.raises(CorpusError, match=what):
        run(llama, replace(SMALL, corpus=str(tmp_path / "c.jsonl")))


def test_missing_and_empty_corpus_paths(llama, tmp_path, no_device_work):
    with pytest.raises(CorpusError, match="does not exist"):
        run(llama, replace(SMALL, corpus=str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="folder holds no corpus files"):
        run(llama, replace(SMALL, corpus=str(tmp_path / "empty")))


# -- bad model inputs -----------------------------------------------------------------------------


def test_missing_tokenizer(tmp_path, no_device_work):
    save_hf_model("qwen2", tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerMissingError, match="tokenizer.json: missing"):
        run(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="not a valid"):
        run(tmp_path)


def test_tokenizer_beyond_vocabulary(tmp_path, no_device_work):
    save_hf_model("qwen2", tmp_path)
    make_tokenizer(tmp_path, vocab_size=400)  # ids up to 399, the model has 128 rows
    with pytest.raises(TokenizerError, match="vocab_size=128"):
        run(tmp_path, replace(SMALL, seq_len=32))


def test_sequence_beyond_positions(llama, no_device_work):
    with pytest.raises(SequenceLengthError, match="max_position_embeddings=64"):
        run(llama, replace(SMALL, seq_len=65))


def test_unsupported_architecture(tmp_path, no_device_work):
    save_hf_model("llama", tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gpt2'.*supported"):
        run(tmp_path)


def test_missing_layer_tensor(tmp_path, no_device_work):
    save_pangu(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLayoutError, match=r"layer 1: .*experts.gate_up_proj needs 8 experts"):
        run(tmp_path)


def test_bf16_on_a_device_without_bf16(llama, no_device_work):
    ctx = replace(CTX, device=replace(CTX.device, supports_bf16=False, name="Ascend310P"))
    with pytest.raises(ActivationInputError, match="Ascend310P has no bf16"):
        run(llama, replace(SMALL, dtype="bfloat16"), ctx)


def test_every_error_is_a_value_error():
    for cls in (
        CorpusError,
        TokenizerMissingError,
        SequenceLengthError,
        UnsupportedArchitectureError,
        WeightLayoutError,
    ):
        assert issubclass(cls, ValueError)


def test_command_needs_a_model_path(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        activations(RunConfig(command="activations", out_dir=str(tmp_path)))


def test_command_writes_outputs(llama, tmp_path):
    import logging

    cfg = RunConfig(
        command="activations",
        model=ModelConfig(path=str(llama)),
        device="cpu",
        out_dir=str(tmp_path),
        activations=SMALL,
    )
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        assert activations(cfg) == tmp_path
    finally:  # the command installs per-rank log handlers; leave the root logger as it was
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
                h.close()
    assert (tmp_path / "logs" / "rank0.log").is_file()
    assert (tmp_path / "activations.csv").is_file() and (tmp_path / "activations.png").is_file()


# -- NaN / Inf ------------------------------------------------------------------------------------


def test_nan_and_inf_are_reported_per_layer(tmp_path):
    save_hf_model("llama", tmp_path, layers=3)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    result = run(tmp_path, replace(SMALL, dtype="float16"))
    rows = {(r["layer"], r["stream"]): r for r in result.rows}
    assert rows[(0, "mlp")]["nan"] == rows[(0, "mlp")]["inf"] == 0
    bad = rows[(1, "mlp")]
    assert bad["nan"] + bad["inf"] == bad["tokens"] == 16
    assert bad["mean_norm"] is None and bad["std_norm"] is None
    assert rows[(2, "residual")]["nan"] + rows[(2, "residual")]["inf"] == 16
    # such rows still go into a strict-JSON signature and the CSV / plot
    from npu_fp.report.activation_report import write_activation_outputs
    from npu_fp.signature import dumps

    assert '"mean_norm": null' in dumps({"activations": {"rows": result.rows}})
    write_activation_outputs(result, tmp_path / "out")
    assert (tmp_path / "out" / "activations.png").is_file()


# -- plans and memory -----------------------------------------------------------------------------


def test_pipeline_stages_are_contiguous_and_balanced():
    assert pipeline_stages([1] * 6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert pipeline_stages([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert pipeline_stages([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert pipeline_stages([1, 1, 1], 1) == [range(0, 3)]
    for sizes, world in (([3, 1, 4, 1, 5, 9, 2, 6], 3), ([1] * 7, 7), ([9, 1, 1], 2)):
        stages = pipeline_stages(sizes, world)
        assert len(stages) == world and all(len(s) > 0 for s in stages)
        assert [i for s in stages for i in s] == list(range(len(sizes)))
    with pytest.raises(ActivationInputError, match="at least one layer per rank"):
        pipeline_stages([1, 1], 3)


def test_batches_are_split_over_ranks_exactly_once():
    for world in (1, 2, 3, 4):
        got = sorted(b for r in range(world) for b in assign_batches(10, world, r))
        assert got == list(range(10))


def test_resident_weights_do_not_grow_with_depth(tmp_path, monkeypatch):
    peaks = {}
    built = {}
    orig = LayerStreamer.release

    def spy(self):
        peaks[self.model.num_layers] = self.peak_weight_bytes
        built[self.model.num_layers] = self.layers_built
        orig(self)

    monkeypatch.setattr(LayerStreamer, "release", spy)
    for depth in (2, 4, 8):
        save_hf_model("qwen2", tmp_path / str(depth), layers=depth)
        run(tmp_path / str(depth), replace(SMALL, num_batches=3, pass_batches=2))
    one_layer = peaks[2]
    assert one_layer > 0 and peaks[4] == one_layer and peaks[8] == one_layer
    assert built == {2: 4, 4: 8, 8: 16}  # 2 passes x depth: each layer streamed once per pass
