"""Small hashing helpers shared by data preparation, tokenizers, checkpoints and sweeps."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["sha256_file", "sha256_json"]


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys): equal content, equal digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (bounded memory for multi-GB shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
