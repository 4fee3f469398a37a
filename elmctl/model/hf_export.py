"""What an exported folder needs besides the weights: our modelling code and tokenizer files tools read.

``write_hf_code(folder)`` copies ``configuration_openelm.py`` and ``modeling_openelm.py`` (package
``elmctl.model.hf_code``; they import only torch and transformers), so the folder loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` through the ``auto_map`` that
:func:`elmctl.model.hf.save_pretrained` writes into ``config.json``.

``write_tokenizer_files(spec, folder)`` writes the tokenizer so that ``AutoTokenizer.from_pretrained(folder)``
(and ``mlx_lm``) give elmctl's ids:

================  ==========================================================================
elmctl tokenizer  files written
================  ==========================================================================
SentencePiece     ``tokenizer.model`` (copied, for SentencePiece-based tools) and a ``tokenizer.json``
                  built from it (NFC, the model's normaliser, BPE merges by score or Unigram, byte
                  fallback), ``tokenizer_config.json``, ``special_tokens_map.json``
tokenizer.json    ``tokenizer.json`` (a copy; only its post-processor is replaced, see BOS below),
                  ``tokenizer_config.json``, ``special_tokens_map.json``
``byte``          ``tokenizer.json`` built with ``tokenizers`` (byte-level, ids = byte + 3),
                  ``tokenizer_config.json``, ``special_tokens_map.json``
================  ==========================================================================

Conventions:

- BOS is added whenever the tokenizer has one (``elmctl data prepare`` starts every document with BOS,
  and OpenELM's lm-eval harness runs the LLaMA tokenizer with ``add_bos_token=True``), so
  ``tokenizer(text).input_ids == tok.encode(text, add_bos=True)``; EOS is never added. The BOS rule
  lives in tokenizer.json's post-processor (transformers 5 reads it only there).
- ``tokenizer_class`` is ``PreTrainedTokenizerFast`` for every layout: transformers 5's ``LlamaTokenizer``
  rebuilds its pipeline from the vocabulary, ignoring tokenizer.json's normaliser, and its ids then
  differ from SentencePiece's for text starting with a space and for text that is not NFC.
- ``chat_template`` (pass :data:`CHAT_TEMPLATE` for tuned models) reproduces
  :func:`elmctl.data.chat.encode_chat` exactly, ids included.
- Decoding text ids equals elmctl's ``decode``; for the byte tokenizer also any ids (invalid UTF-8
  included) with ``skip_special_tokens=True``.
- A limit of HF tokenizers, not of these files: text that spells a special token (``"</s>"``) is read
  as that token, where elmctl encodes its characters.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from elmctl.errors import UsageError

__all__ = ["CHAT_TEMPLATE", "write_hf_code", "write_tokenizer_files", "byte_tokenizer_json", "sentencepiece_tokenizer_json"]

# elmctl.data.chat's template as Jinja: [BOS] "<|role|>\n{content}" EOS, turns joined by "\n", then
# "\n<|assistant|>\n" (no leading "\n" without turns). HF splits the rendered text at special tokens and
# encodes each run alone, which is what encode_chat does between EOS ids.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def write_hf_code(folder: str | os.PathLike) -> list[Path]:
    """Copy ``configuration_openelm.py`` and ``modeling_openelm.py`` into ``folder``; returns their paths."""
    from elmctl.model.hf_code import FILES

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("elmctl.model.hf_code")
    written = []
    for name in FILES:
        path = target / name
        _write_atomic(path, source.joinpath(name).read_bytes())
        written.append(path)
    return written


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    _write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """A ``tokenizer.json`` equal to elmctl's byte tokenizer: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, byte b -> 3 + b.

    A byte-level BPE with no merges: every UTF-8 byte is one token; decoding joins the bytes and
    replaces invalid UTF-8 as Python's ``errors="replace"`` does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from elmctl.data.tokenizers import ByteTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(specials)}
    vocab.update({char: ByteTokenizer.offset + b for b, char in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok.to_str(pretty=True)


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varint/fixed32 fields, bytes otherwise."""
    fields, i = [], 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = data[i]
            i += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, varint()))
        elif wire == 1:
            fields.append((number, int.from_bytes(data[i:i + 8], "little")))
            i += 8
        elif wire == 2:
            size = varint()
            fields.append((number, data[i:i + size]))
            i += size
        elif wire == 5:
            fields.append((number, int.from_bytes(data[i:i + 4], "little")))
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _read_sentencepiece(path: Path) -> dict[str, Any]:
    """The parts of a SentencePiece ``ModelProto`` a tokenizers pipeline needs (sentencepiece_model.proto):
    pieces (piece, score, type), trainer_spec.model_type / byte_fallback, and the normalizer_spec."""
    import struct

    pieces, trainer, normalizer = [], {}, {}
    for number, value in _proto_fields(path.read_bytes()):
        if number == 1:  # SentencePiece {1 piece, 2 score (float), 3 type (1 normal 2 unk 3 control 4 user 5 unused 6 byte)}
            piece = {"piece": "", "score": 0.0, "type": 1}
            for n, v in _proto_fields(value):
                if n == 1:
                    piece["piece"] = v.decode("utf-8")
                elif n == 2:
                    piece["score"] = struct.unpack("<f", v.to_bytes(4, "little"))[0]
                elif n == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif number == 2:  # TrainerSpec {3 model_type (1 unigram, 2 bpe), 35 byte_fallback}
            trainer = dict(_proto_fields(value))
        elif number == 3:  # NormalizerSpec {1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces}
            normalizer = dict(_proto_fields(value))
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, 1),
        "byte_fallback": bool(trainer.get(35, 0)),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def sentencepiece_tokenizer_json(path: str | os.PathLike) -> str:
    """A ``tokenizer.json`` that encodes like elmctl's SentencePiece wrapper: NFC, then the model's own
    normalisation (precompiled rules, extra-whitespace removal, dummy prefix, "▁" for spaces), then
    BPE (merges ranked by piece score) or Unigram, with byte fallback; no special tokens in the ids.

    Raises:
        UsageError: the model is neither BPE nor Unigram (word/char models are not supported).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    spec = _read_sentencepiece(Path(path))
    pieces = spec["pieces"]
    unk_id = next((i for i, p in enumerate(pieces) if p["type"] == 2), 0)
    if spec["model_type"] == 2:  # BPE: merging a pair into a higher-scoring piece comes first
        vocab = {p["piece"]: i for i, p in enumerate(pieces)}
        normal = {p["piece"]: (p["score"], i) for i, p in enumerate(pieces) if p["type"] == 1}
        ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        model = models.BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in ranked],
                           unk_token=pieces[unk_id]["piece"], fuse_unk=True, byte_fallback=spec["byte_fallback"])
    elif spec["model_type"] == 1:
        model = models.Unigram([(p["piece"], p["score"]) for p in pieces], unk_id, spec["byte_fallback"])
    else:
        raise UsageError(f"{path}: SentencePiece model type {spec['model_type']} (word/char) cannot be exported "
                         "as tokenizer.json", "use a BPE or Unigram SentencePiece model")
    tok = Tokenizer(model)
    steps = [normalizers.NFC()]  # elmctl's SentencePiece wrapper normalises to NFC first (as CoreNet does)
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:  # spaces only; SentencePiece keeps other whitespace
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if spec["add_dummy_prefix"]:  # per run of text between special tokens, as each encode() call adds it
        steps.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if spec["add_dummy_prefix"] else []))
    # unk and control pieces (<s>, </s>) are special tokens; user-defined pieces are always emitted whole
    tok.add_special_tokens([AddedToken(p["piece"], special=True, normalized=False) for p in pieces if p["type"] in (2, 3)])
    tok.add_tokens([AddedToken(p["piece"], normalized=False) for p in pieces if p["type"] == 4])
    return tok.to_str(pretty=True)


def _prepend_bos(tok, bos: tuple[str, int] | None) -> None:
    """Set the post-processor: BOS before each sequence (None: nothing added)."""
    from tokenizers import processors

    if bos is None:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
        return
    name = bos[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{name} $A", pair=f"{name} $A {name} $B",
                                                       special_tokens=[bos])


def write_tokenizer_files(tokenizer_spec: str | os.PathLike, folder: str | os.PathLike, *,
                          chat_template: str | None = None, model_max_length: int | None = None) -> list[Path]:
    """Write the tokenizer named by ``tokenizer_spec`` into ``folder`` in the standard HF layout.

    Args:
        tokenizer_spec: what :func:`elmctl.data.tokenizers.load_tokenizer` takes: ``byte``, a
            ``tokenizer.model``, a ``tokenizer.json``, or a folder holding one.
        folder: the export folder (created if missing). Nothing else there is touched: a caller reusing
            a folder removes files of another tokenizer layout (``tokenizer.model`` would win in
            elmctl, ``chat_template.jinja`` in transformers), as ``elmctl export`` does with its own.
        chat_template: Jinja chat template stored as ``chat_template`` (tuned models: :data:`CHAT_TEMPLATE`).
        model_max_length: the model's context length, stored for tools that truncate.

    Returns:
        The files written.

    Raises:
        UsageError: the tokenizer cannot be loaded (see ``load_tokenizer``), or is a SentencePiece
            word/char model.
    """
    from tokenizers import AddedToken, Tokenizer

    from elmctl.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if isinstance(tok, ByteTokenizer):
        backend = Tokenizer.from_str(byte_tokenizer_json())
        unk_id: int | None = ByteTokenizer.unk_id
    elif isinstance(tok, SentencePieceTokenizer):
        _write_atomic(target / "tokenizer.model", tok.path.read_bytes())  # for SentencePiece-based tools
        written.append(target / "tokenizer.model")
        backend = Tokenizer.from_str(sentencepiece_tokenizer_json(tok.path))
        unk_id = next((i for i, p in enumerate(_read_sentencepiece(tok.path)["pieces"]) if p["type"] == 2), None)
    else:
        backend = Tokenizer.from_file(tok.spec)
        unk_id = backend.token_to_id("<unk>")
    by_id = {i: name for name, i in backend.get_vocab(with_added_tokens=True).items()}
    names = {key: by_id[i] for key, i in (("unk_token", unk_id), ("bos_token", tok.bos_id), ("eos_token", tok.eos_id))
             if i is not None}
    # Special tokens must be added tokens, so a template's "</s>" becomes the EOS id, not its characters.
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names.values()])
    # BOS comes from tokenizer.json's post-processor (transformers 5 ignores add_bos_token when there is a
    # tokenizer.json); elmctl itself never runs the post-processor, so one from a copied file is replaced.
    if "bos_token" in names:
        _prepend_bos(backend, (names["bos_token"], tok.bos_id))
    else:
        _prepend_bos(backend, None)
    _write_atomic(target / "tokenizer.json", backend.to_str(pretty=True).encode())
    written.append(target / "tokenizer.json")

    # PreTrainedTokenizerFast, also for SentencePiece: transformers 5 rebuilds LlamaTokenizer's pipeline from
    # the vocabulary and ignores tokenizer.json's normaliser, which changes ids (NFD text, a leading space).
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **names,
                              "add_bos_token": "bos_token" in names, "add_eos_token": False,
                              "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        config["chat_template"] = chat_template
    written.append(_write_json(target / "tokenizer_config.json", config))
    written.append(_write_json(target / "special_tokens_map.json", names))
    return written
