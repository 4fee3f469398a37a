"""Tokenizer files in the standard HF layouts: AutoTokenizer (and mlx_lm) give elmctl's ids.

Each layout (byte, a LLaMA-style SentencePiece BPE, a Unigram SentencePiece with NFKC rules, an HF
tokenizer.json) is written by ``write_tokenizer_files`` and read back with ``AutoTokenizer``: ids equal
``tok.encode(text, add_bos=True)`` on random Unicode (emoji, controls, combining marks, NFD text),
decoding equals elmctl's ``decode``, and the chat template equals ``encode_chat``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elmctl
from elmctl.data.chat import encode_chat, format_prompt
from elmctl.data.tokenizers import load_tokenizer
from elmctl.errors import UsageError
from elmctl.model.hf_export import CHAT_TEMPLATE, write_hf_code, write_tokenizer_files

transformers = pytest.importorskip("transformers")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 17 + 25? 42.",
    "Café crème brûlée, naïve résumé.",
    "OpenELM uses layer-wise scaling of attention heads and feed-forward widths.",
] * 50
SPECIALS = ("<unk>", "<s>", "</s>")  # text spelling these is read as the special token by HF tokenizers
# Random Unicode (no surrogates), biased towards what tokenizers get wrong: spaces, controls, emoji, NFD.
TEXT = st.text(st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.sampled_from(list(" \n\t\r\x00\u00a0\u3000\u200d\u0301\ufeffﬁ①😀👩‍👩‍👧🇫🇷é")),
    st.sampled_from(list("abcdefghijklmnopqrstuvwxyz 0123456789.,?")),
), max_size=60).filter(lambda t: not any(s in t for s in SPECIALS))
NFD_TEXT = TEXT.map(lambda t: unicodedata.normalize("NFD", t))
CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " two  spaces\n"},
     {"role": "assistant", "content": "42"}, {"role": "user", "content": "Café? 😀"}],
    [{"role": "user", "content": ""}],  # (transformers refuses an empty conversation)
]


def _train_sp(folder, **options):
    import sentencepiece as spm

    (folder / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, **options)
    return folder / "tokenizer.model"


def _train_hf_bpe(path, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Tokenizer spec per layout name."""
    root = tmp_path_factory.mktemp("tok")
    (root / "llama").mkdir()
    (root / "unigram").mkdir()
    return {
        "byte": "byte",
        # OpenELM's LLaMA-2 tokenizer settings: BPE, identity normaliser, spaces kept, digits split
        "llama": str(_train_sp(root / "llama", vocab_size=400, model_type="bpe", normalization_rule_name="identity",
                               remove_extra_whitespaces=False, split_digits=True)),
        # SentencePiece defaults: Unigram, nmt_nfkc rules, extra whitespace removed
        "unigram": str(_train_sp(root / "unigram", vocab_size=320, model_type="unigram")),
        "hf-json": str(_train_hf_bpe(root / "tokenizer.json")),
    }


@pytest.fixture(scope="module")
def exported(specs, tmp_path_factory):
    """layout -> (AutoTokenizer of the written folder, elmctl tokenizer, folder)."""
    out = {}
    for name, spec in specs.items():
        folder = tmp_path_factory.mktemp(name)
        write_tokenizer_files(spec, folder, chat_template=CHAT_TEMPLATE, model_max_length=256)
        out[name] = (transformers.AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(spec), folder)
    return out


def _ids(encoded):
    """apply_chat_template returns ids (transformers 4) or a BatchEncoding (transformers 5)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_files_and_config(specs, tmp_path):
    files = write_tokenizer_files(specs["llama"], tmp_path, model_max_length=2048)
    assert sorted(p.name for p in files) == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                             "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["model_max_length"] == 2048 and "chat_template" not in config
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    # elmctl reads the folder back as the original SentencePiece model
    assert load_tokenizer(tmp_path).fingerprint == load_tokenizer(specs["llama"]).fingerprint

    # another layout into the same folder: only its own files are written; nothing else there is
    # deleted (removing an earlier export's files is `elmctl export`'s job, which knows they are its own)
    (tmp_path / "chat_template.jinja").write_text("mine")
    files = write_tokenizer_files("byte", tmp_path, chat_template=CHAT_TEMPLATE)
    assert sorted(p.name for p in files) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "chat_template.jinja").read_text() == "mine"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    (tmp_path / "tokenizer.model").unlink()  # as export removes the previous export's SentencePiece file
    assert load_tokenizer(tmp_path).encode("hé") == load_tokenizer("byte").encode("hé")


def test_unknown_tokenizer_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="tokenizer not found"):
        write_tokenizer_files(tmp_path / "nope.model", tmp_path / "out")


@pytest.mark.parametrize("layout", ["byte", "llama", "unigram", "hf-json"])
def test_ids_and_decode_equal_elmctl(exported, layout):
    hf, tok, _ = exported[layout]
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)

    @SETTINGS
    @given(text=st.one_of(TEXT, NFD_TEXT))
    def check(text):
        ids = hf(text).input_ids
        assert ids == tok.encode(text, add_bos=True)
        assert hf.decode(ids[1:]) == tok.decode(ids[1:])

    check()


def test_byte_decode_of_any_ids(exported):
    """Random ids, invalid UTF-8 and specials included, decode as elmctl's byte tokenizer does."""
    hf, tok, _ = exported["byte"]

    @SETTINGS
    @given(ids=st.lists(st.one_of(st.integers(0, 258), st.integers(0x80 + 3, 0xFF + 3)), max_size=40))
    def check(ids):
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)

    check()


@pytest.mark.parametrize("layout", ["byte", "llama", "unigram", "hf-json"])
def test_chat_template_equals_encode_chat(exported, layout):
    hf, tok, _ = exported[layout]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == "<s>" + format_prompt(messages, add_generation_prompt=gen)
            ids = _ids(hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))
            assert ids == encode_chat(tok, messages, add_generation_prompt=gen), (messages, gen)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(contents=st.lists(TEXT, min_size=1, max_size=3))
    def check(contents):
        messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
        ids = _ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        assert ids == encode_chat(tok, messages)

    check()
    with pytest.raises(Exception, match="role must be"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- mlx_lm reads every layout ------------------------------------------------------------------------

@pytest.mark.parametrize("layout,chat", [("byte", True), ("llama", False), ("unigram", True), ("hf-json", False)])
def test_mlx_lm_generate_runs_and_matches(specs, tmp_path, layout, chat):
    """`python -m mlx_lm generate` exits 0 on an export, and mlx's greedy tokens equal elmctl's."""
    pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.generate import generate_step
    import mlx.core as mx

    from elmctl.model.generate import generate

    tok = load_tokenizer(specs[layout])
    torch.manual_seed(3)
    v = tok.vocab_size  # the model's vocabulary is the tokenizer's, as in a real export (mlx decodes every id)
    model = elmctl.build_model("tiny", vocab_size=v, padded_vocab_size=(v + 64) // 64 * 64, pad_token_id=v)
    elmctl.save_pretrained(model, tmp_path)
    write_hf_code(tmp_path)
    write_tokenizer_files(specs[layout], tmp_path, chat_template=CHAT_TEMPLATE if chat else None)
    prompt = "What is 17 + 25?"

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    run = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tmp_path), "--prompt", prompt,
                          "--max-tokens", "8", "--verbose", "False"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    ids = encode_chat(tok, [{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, add_bos=True)
    ours = generate(model, torch.tensor(ids), 8, eos_id=tok.eos_id)[len(ids):].tolist()
    ours = ours[:ours.index(tok.eos_id) + 1] if tok.eos_id in ours else ours

    mlx_model, mlx_tok = mlx_lm.load(str(tmp_path))
    mlx_ids = (_ids(mlx_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
               if chat else mlx_tok.encode(prompt))
    assert list(mlx_ids) == ids
    theirs = []
    for (token, _), _ in zip(generate_step(mx.array(mlx_ids), mlx_model, max_tokens=8), range(8)):
        theirs.append(int(token))
        if int(token) == tok.eos_id:
            break
    assert theirs == ours
    text = mlx_tok.decode([t for t in ours if t != tok.eos_id])
    if "\ufffd" not in text:  # mlx's streaming detokenizer renders broken UTF-8 its own way
        assert run.stdout.rstrip("\n") == text
