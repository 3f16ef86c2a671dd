"""GGUF vocabularies become `tokenizers` tokenizer.json files (npu_fp/realweights.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import run_cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from npu_fp import realweights
from npu_fp.realweights import (
    CONVERSION,
    MODELS,
    _built,
    _whitespace_merges_longest_first,
    gguf_tokenizer,
)

CACHE = Path(
    os.environ.get("NPU_FP_REAL_CACHE", Path.home() / ".cache" / "npu_fp" / "real-weights")
)
TEXTS = ("hello world", "lower newest <|end|> low", "  two spaces, tab\tand café")


MERGES = ["l o", "lo w", "e r", "Ġ n", "Ġn e", "Ġne w", "h e", "he l", "hel l", "hell o"]


def _byte_level_gguf(path: Path, add_bos: bool) -> tuple[Path, list[str]]:
    """A GGUF file with a GPT-2 style vocabulary, written by gguf's writer: every byte, a few
    merges, one control token."""
    spelling = gguf.vocab.bytes_to_unicode()
    tokens = ["<|end|>", *dict.fromkeys(spelling.values())] + [m.replace(" ", "") for m in MERGES]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tokens


def _gpt2_reference(tokens: list[str]) -> Tokenizer:
    """The same vocabulary as a GPT-2 tokenizer.json would hold it, built from tokenizers' parts."""
    merges = [tuple(m.split(" ")) for m in MERGES]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|end|>"])
    return tok


@pytest.mark.parametrize("add_bos", [False, True])
def test_byte_level_gguf_vocabulary_is_a_loadable_bpe_tokenizer(
    tmp_path: Path, add_bos: bool
) -> None:
    path, tokens = _byte_level_gguf(tmp_path / "v.gguf", add_bos)
    gguf_tokenizer(path).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what `activations` loads
    ref = _gpt2_reference(tokens)
    for text in (*TEXTS, "hello lower <|end|> new"):
        got = tok.encode(text).ids
        assert got[:1] == [0] if add_bos else got[:1] != [0]  # BOS only where the file asks
        assert got[int(add_bos) :] == ref.encode(text).ids
        assert tok.decode(got, skip_special_tokens=False).endswith(text)
    assert (
        "Ġnew" in tok.encode("a new <|end|>").tokens and "<|end|>" in tok.encode("<|end|>").tokens
    )


def test_space_run_merges_rank_longer_left_part_first() -> None:
    """A run of spaces splits into the longest space tokens first, as Gemma's tokenizer does,
    whatever order the rebuilt merges came in (shortest first, as transformers rebuilds them)."""
    sp = "\u2581"
    longest = 8
    vocab = {sp * n: n - 1 for n in range(1, longest + 1)} | {"a": longest, f"{sp}a": longest + 1}
    shortest_first = [
        (sp * a, sp * b) for n in range(2, longest + 1) for a in range(1, n) for b in [n - a]
    ]
    merges = [(sp, "a"), *shortest_first]
    reordered = [tuple(m) for m in _whitespace_merges_longest_first([list(m) for m in merges])]
    assert reordered[0] == (sp, "a") and sorted(reordered) == sorted(merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=reordered))
    for n in range(1, 3 * longest + 2):
        want = [sp * longest] * (n // longest) + ([sp * (n % longest)] if n % longest else [])
        assert tok.encode(sp * n).tokens == want, n


def test_a_folder_of_an_older_conversion_is_rebuilt(tmp_path: Path) -> None:
    model = next(m for m in MODELS if m.kind == "gguf")
    folder = tmp_path / model.key
    folder.mkdir()
    (folder / "SOURCE").write_text(f"{model.sha256} {model.name}\n")
    assert CONVERSION["gguf"] > 1 and not _built(folder, model)  # no stamp: version 1
    (folder / "CONVERSION").write_text(f"{CONVERSION['gguf']}\n")
    assert _built(folder, model)
    (folder / "SOURCE").write_text(f"00{model.sha256} {model.name}\n")
    assert not _built(folder, model)


@pytest.mark.slow
def test_real_gguf_tokenizers_load_and_activations_run_on_s(tmp_path: Path) -> None:
    real = realweights.prepare(CACHE, ("S", "G"))
    for key in ("S", "G"):
        assert (real[key] / "CONVERSION").read_text().strip() == str(CONVERSION["gguf"])
        tok = Tokenizer.from_file(str(real[key] / "tokenizer.json"))
        for text in TEXTS:
            assert tok.decode(tok.encode(text).ids).strip() == text.strip()
    s = Tokenizer.from_file(str(real["S"] / "tokenizer.json"))
    assert s.encode("<|im_start|>user").tokens == ["<|im_start|>", "user"]
    g = Tokenizer.from_file(str(real["G"] / "tokenizer.json"))
    assert g.encode("hi").tokens[0] == "<bos>"  # gemma's file asks for BOS
    out = tmp_path / "out"
    args = [
        "-m",
        "npu_fp",
        "activations",
        f"model.path={real['S']}",
        f"hydra.run.dir={out}",
        "device=cpu",
        "progress=false",
        "activations.num_batches=2",
        "activations.batch_size=2",
        "activations.seq_len=32",
    ]
    r = run_cli(args, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (out / "activations.csv").read_text().splitlines()
    layers = {line.split(",")[0] for line in rows[1:]}
    assert len(layers) >= 30, layers  # SmolLM2-135M: 30 decoder layers, every one measured
    shutil.rmtree(out)
