"""Tokenizers: OpenELM's LLaMA SentencePiece model, any HF ``tokenizer.json``, and a byte tokenizer.

``load_tokenizer(spec)`` takes:

- ``byte``: built-in byte-level tokenizer for demos and tests. Ids: 0 ``<unk>``, 1 ``<s>`` (BOS),
  2 ``</s>`` (EOS), byte ``b`` -> ``3 + b``; vocabulary 259. Lossless for any UTF-8 text.
- a path to ``tokenizer.model``: SentencePiece (OpenELM/CoreNet use the LLaMA-2 model). Text is
  NFC-normalised first, as CoreNet's ``SentencePieceTokenizer`` does; BOS/EOS come from the model.
- a path to ``tokenizer.json``: Hugging Face ``tokenizers``. Special tokens are never added by the
  post-processor; BOS/EOS are looked up by their usual names and added by the caller.
- a folder holding one of these (``tokenizer.model`` is preferred: it is OpenELM's original).

Every tokenizer has ``.spec`` (what to pass to load it again, e.g. in a worker process),
``.fingerprint`` (sha256 of the model file, so a changed file invalidates prepared data),
``.vocab_size``, ``.bos_id``, ``.eos_id`` (``bos_id`` may be ``None``), ``.encode`` and ``.decode``.
``.decode`` skips ids outside ``0..vocab_size-1`` (a model may have more output rows than its
tokenizer has pieces).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from elmctl._files import sha256_file
from elmctl.errors import UsageError

if TYPE_CHECKING:
    from elmctl.config.schema import Recipe

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "check_vocab",
    "token_dtype",
]

_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")


class Tokenizer(Protocol):
    """What every elmctl tokenizer offers."""

    spec: str
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _wrap(ids: list[int], bos: int | None, eos: int, add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos and bos is not None:
        ids = [bos] + ids
    if add_eos:
        ids = ids + [eos]
    return ids


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 past ``<unk>``, ``<s>``, ``</s>`` (vocabulary 259)."""

    spec = "byte"
    fingerprint = hashlib.sha256(b"elmctl-byte-tokenizer-v1").hexdigest()
    vocab_size = 259
    unk_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return _wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # numpy instead of a Python loop: this is the hot path of `data prepare` with bytes.
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) + self.offset for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model (OpenELM: LLaMA-2's 32000-piece ``tokenizer.model``), NFC first."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path).resolve()
        self.spec = str(self.path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise UsageError(f"{self.path}: not a SentencePiece model ({exc})") from exc
        self.fingerprint = sha256_file(self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        bos, eos = int(self._sp.bos_id()), int(self._sp.eos_id())
        if eos < 0:
            raise UsageError(f"{self.path}: the SentencePiece model has no EOS piece", "train it with eos_id set")
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._sp.encode(unicodedata.normalize("NFC", text))
        return _wrap(list(ids), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._sp.encode([unicodedata.normalize("NFC", t) for t in texts])
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids) -> str:
        # ids without a piece are skipped, as ByteTokenizer and HF `tokenizers` do (SentencePiece
        # raises IndexError): a model may have more output rows than this tokenizer has pieces
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``; the post-processor's special tokens are not used."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path).resolve()
        self.spec = str(self.path)
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise UsageError(f"{self.path}: not a Hugging Face tokenizer.json ({exc})") from exc
        self.fingerprint = sha256_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.bos_id = next((vocab[n] for n in _BOS_NAMES if n in vocab), None)
        eos = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
        if eos is None:
            raise UsageError(
                f"{self.path}: no end-of-text token found (looked for {', '.join(_EOS_NAMES)})",
                "add one as a special token when training the tokenizer",
            )
        self.eos_id = int(eos)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _wrap(list(ids), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """Load a tokenizer from ``byte``, a ``tokenizer.model``/``tokenizer.json`` path, or a folder.

    Raises:
        UsageError: the path does not exist or holds no recognised tokenizer file.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(
                f"{path}: folder holds neither tokenizer.model nor tokenizer.json",
                "pass --tokenizer byte, a tokenizer.model (SentencePiece) or a tokenizer.json file",
            )
    if not path.is_file():
        raise UsageError(f"tokenizer not found: {spec}", "pass --tokenizer byte, or a path to tokenizer.model/.json")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise UsageError(
        f"{path}: unknown tokenizer file type", "use a SentencePiece .model or a Hugging Face tokenizer.json"
    )


def check_vocab(tokenizer: Tokenizer, recipe: "Recipe") -> None:
    """Refuse a tokenizer whose ids do not fit the recipe's vocabulary.

    Raises:
        UsageError: the tokenizer has more tokens than ``recipe.model.vocab_size``.
    """
    limit = recipe.model.vocab_size
    if tokenizer.vocab_size > limit:
        raise UsageError(
            f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but recipe {recipe.id!r} "
            f"has a vocabulary of {limit}: ids >= {limit} would index past the embedding",
            "use the recipe's tokenizer (byte for tiny, LLaMA-2 tokenizer.model for OpenELM) or a recipe "
            "with a larger model.vocab_size",
        )
