"""Pre-training token shards: the on-disk layout, the writer, and ``TokenDataset`` for training.

Layout of a prepared folder (``elmctl data prepare`` / ``elmctl data demo``)::

    manifest.json          written last; its absence means "incomplete, rebuild"
    manifest.partial.json  only while a build runs (or after it crashed): the names it may create
    train-00000.bin ...    flat little-endian token ids (dtype in the manifest: uint16 or uint32)
    val-00000.bin ...      the held-out split (documents chosen by hash of their text)

Each document is stored as ``[BOS] ids [EOS]`` (BOS only when the tokenizer has one), as CoreNet's
SentencePiece pipeline does, and documents follow each other without padding: a split is one long
token stream cut into shards of ``shard_tokens`` tokens (a document may straddle two shards).
Other files in the folder are the user's: a rebuild deletes only what the old manifest lists
(see :class:`elmctl.data._manifest.OutputFolder`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from elmctl.data._manifest import read_manifest, resolve_data_dir
from elmctl.errors import UsageError

__all__ = ["TokenDataset", "ShardWriter", "shard_name"]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Append token arrays to ``{split}-NNNNN.bin`` shards of exactly ``shard_tokens`` tokens.

    Each shard is written as ``*.tmp`` and renamed when full (or at :meth:`close`), so a crash
    never leaves a file with a final name and partial contents.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 on_new_file: Callable[[str], None] | None = None):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.on_new_file = on_new_file  # told each shard name before its file is created (the build journal)
        self.files: list[dict[str, Any]] = []
        self.num_tokens = 0
        self._f = None
        self._hash = None
        self._in_shard = 0

    def _open(self) -> None:
        name = shard_name(self.split, len(self.files))
        self._tmp = self.folder / (name + ".tmp")
        self._name = name
        if self.on_new_file is not None:
            self.on_new_file(name)
        self._f = open(self._tmp, "xb")  # never through a file (or link) someone else left there
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def _seal(self) -> None:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.folder / self._name)
        self.files.append(
            {
                "name": self._name,
                "split": self.split,
                "tokens": self._in_shard,
                "bytes": self._in_shard * self.dtype.itemsize,
                "sha256": self._hash.hexdigest(),
            }
        )
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(data):
            if self._f is None:
                self._open()
            take = min(len(data) - pos, self.shard_tokens - self._in_shard)
            chunk = data[pos : pos + take].astype("<" + self.dtype.str[1:], copy=False).tobytes()
            self._f.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.num_tokens += take
            pos += take
            if self._in_shard == self.shard_tokens:
                self._seal()

    def close(self) -> None:
        if self._f is not None:
            self._seal()

    def abort(self) -> None:
        """Remove everything this writer produced (used when the run fails)."""
        if self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)
            self._f = None
        for f in self.files:
            (self.folder / f["name"]).unlink(missing_ok=True)


class TokenDataset:
    """A prepared split as one token stream, memory-mapped (nothing is loaded up front).

    Args:
        root: a prepared pretrain folder, or a folder with a ``pretrain/`` subfolder.
        split: ``train`` or ``val``.

    Raises:
        UsageError: no prepared data there, a shard is missing or truncated, or the split is empty.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        if split not in ("train", "val"):
            raise UsageError(f"unknown split {split!r}", "use train or val")
        self.root = resolve_data_dir(root, "pretrain")
        self.manifest: dict[str, Any] = read_manifest(self.root) or {}
        self.split = split
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eos_id = int(self.manifest["eos_id"])
        self.bos_id = self.manifest.get("bos_id")
        self.dtype = np.dtype(self.manifest["dtype"])
        files = [f for f in self.manifest["files"] if f["split"] == split]
        self._maps = []
        for f in files:
            path = self.root / f["name"]
            if not path.is_file() or path.stat().st_size != f["bytes"]:
                raise UsageError(f"{path}: missing or truncated shard", f"re-run `elmctl data prepare` for {self.root}")
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(f["tokens"],)))
        lengths = np.array([len(m) for m in self._maps], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens == 0:
            raise UsageError(
                f"{self.root}: the {split} split is empty",
                "prepare with a larger --val-fraction or more input" if split == "val" else "add input documents",
            )

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens from position ``start`` (mod num_tokens), wrapping around the end."""
        out = np.empty(length, dtype=np.int64)
        pos = int(start) % self.num_tokens
        filled = 0
        while filled < length:
            k = int(np.searchsorted(self._starts, pos, side="right")) - 1
            local = pos - int(self._starts[k])
            take = min(length - filled, len(self._maps[k]) - local)
            out[filled : filled + take] = self._maps[k][local : local + take]
            filled += take
            pos = (pos + take) % self.num_tokens
        return out
