"""Issue #10 class 9: `generate` with a tokenizer smaller than the model's vocabulary.

A model whose output layer has more rows than its tokenizer has pieces (a tiny recipe, 259 ids,
trained on data from a 80-piece SentencePiece model) can emit an id the tokenizer cannot decode.
Before: SentencePiece raised ``IndexError: OUT_OF_RANGE: piece id is out of range`` out of
`elmctl generate`. Now such ids are never sampled, and decoding skips ids outside the vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch

from adv_util import one_torch_thread, small_hf_tokenizer, small_sentencepiece, tiny_hf


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return small_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory, sp_model):
    with one_torch_thread():
        yield tiny_hf(tmp_path_factory.mktemp("m") / "hf", sp_model)


def _gen(cli, folder, *extra):
    r = cli("generate", str(folder), "-p", "What is", "-n", "24", "--format", "json", *extra)
    assert "Traceback" not in r.err
    assert r.code == 0, r.err
    return json.loads(r.out)


@pytest.mark.parametrize("sampling", [(), ("-t", "50", "--seed", "0")], ids=["greedy", "hot"])
def test_generate_with_smaller_sentencepiece_never_emits_unknown_ids(cli, sp_folder, sp_model, sampling):
    from elmctl.data.tokenizers import load_tokenizer

    tok = load_tokenizer(sp_model)
    assert tok.vocab_size < 259  # the model has 259 real rows: ids tok.vocab_size..258 are not pieces
    out = _gen(cli, sp_folder, *sampling)
    assert out["tokenizer"].endswith("tokenizer.model")
    assert out["new_tokens"] >= 1


def test_generate_samples_only_below_the_given_vocab():
    from elmctl.config import load_recipe
    from elmctl.model import OpenELM
    from elmctl.model.generate import generate

    torch.manual_seed(0)
    model = OpenELM(load_recipe("tiny").model)
    prompt = torch.tensor([5, 6, 7])
    for temperature in (0.0, 100.0):
        gen = torch.Generator().manual_seed(0)
        out = generate(model, prompt, 40, temperature=temperature, vocab_size=30, generator=gen)
        assert out[3:].max().item() < 30
    with pytest.raises(ValueError):
        generate(model, prompt, 2, vocab_size=0)
    with pytest.raises(ValueError):
        generate(model, prompt, 2, vocab_size=260)  # more than the model's 259 real rows


def test_decode_skips_ids_outside_the_vocabulary(sp_model, tmp_path):
    from elmctl.data.tokenizers import load_tokenizer

    sp = load_tokenizer(sp_model)
    ids = sp.encode("What is")
    assert sp.decode([*ids, sp.vocab_size, 258, -1]) == sp.decode(ids) == "What is"
    hf = load_tokenizer(small_hf_tokenizer(tmp_path / "tokenizer.json"))
    ids = hf.encode("fox")
    assert hf.decode([*ids, hf.vocab_size + 5]) == hf.decode(ids)

