"""Tokenizers: byte ids, SentencePiece and HF tokenizers trained on the fly, vocab checks."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from elmctl.config import load_recipe
from elmctl.data.tokenizers import ByteTokenizer, check_vocab, load_tokenizer, token_dtype
from elmctl.errors import UsageError

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 17 + 25? 42.",
    "Café crème brûlée, naïve résumé.",
    "OpenELM uses layer-wise scaling of attention heads and feed-forward widths.",
] * 50


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model with LLaMA's special-token layout (unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(TEXT))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        minloglevel=2,
    )
    return d / "tokenizer.model"


def train_hf_bpe(path, vocab_size=300, texts=TEXT):
    """Train a byte-level HF BPE tokenizer.json with <unk>, <s>, </s> specials (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    return train_hf_bpe(tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_byte_tokenizer_ids():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.spec) == (259, 1, 2, "byte")
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.encode("é", add_bos=True, add_eos=True) == [1, 0xC3 + 3, 0xA9 + 3, 2]
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
    assert tok.decode([1, 3 + ord("x"), 2]) == "x"  # specials are skipped
    batch = tok.encode_batch(["ab", ""])
    assert batch[0].tolist() == [100, 101] and batch[1].size == 0


def test_sentencepiece(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.vocab_size == 400 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.spec == str(sp_model.resolve()) and len(tok.fingerprint) == 64
    ids = tok.encode("What is 17 + 25?", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 400 for i in ids)
    assert tok.decode(ids[1:-1]) == "What is 17 + 25?"
    # NFC: decomposed "é" (e + combining acute) encodes like the composed one
    decomposed = unicodedata.normalize("NFD", "Café")
    assert decomposed != "Café" and tok.encode(decomposed) == tok.encode("Café")
    assert [a.tolist() for a in tok.encode_batch(["Café", decomposed])] == [tok.encode("Café")] * 2
    # a folder holding tokenizer.model loads the same model
    assert load_tokenizer(sp_model.parent).fingerprint == tok.fingerprint


def test_hf_tokenizer(hf_json):
    tok = load_tokenizer(hf_json)
    assert tok.vocab_size == 300 and tok.bos_id == 1 and tok.eos_id == 2
    ids = tok.encode("the lazy dog", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.decode(ids[1:-1]) == "the lazy dog"
    assert tok.encode_batch(["the lazy dog"])[0].tolist() == ids[1:-1]
    assert load_tokenizer(hf_json.parent).spec == tok.spec


def test_fingerprint_follows_file_content(tmp_path, hf_json):
    other = train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=280)
    assert load_tokenizer(other).fingerprint != load_tokenizer(hf_json).fingerprint


def test_hf_without_eos_is_a_usage_error(tmp_path, hf_json):
    data = json.loads(hf_json.read_text())
    for t in data["added_tokens"]:
        t["content"] = t["content"].replace("</s>", "<end>")
    data["model"]["vocab"] = {k.replace("</s>", "<end>"): v for k, v in data["model"]["vocab"].items()}
    (tmp_path / "x.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="no end-of-text token"):
        load_tokenizer(tmp_path / "x.json")


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(UsageError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(UsageError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_check_vocab(hf_json, sp_model):
    tiny = load_recipe("tiny")  # vocab 259
    check_vocab(load_tokenizer("byte"), tiny)
    with pytest.raises(UsageError, match="400 tokens"):
        check_vocab(load_tokenizer(sp_model), tiny)
    check_vocab(load_tokenizer(sp_model), load_recipe("270m"))  # 400 <= 32000: fits
    with pytest.raises(UsageError) as err:
        check_vocab(load_tokenizer(hf_json), tiny)  # 300 > 259
    assert "300 tokens" in err.value.message and "259" in err.value.message and "'tiny'" in err.value.message
    check_vocab(load_tokenizer(hf_json), load_recipe("270m"))


def test_token_dtype():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
