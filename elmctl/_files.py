"""Small file helpers: hashing (data preparation, tokenizers, checkpoints, sweeps) and bounded reading.

Bounded reading is the one home of every size and depth limit on the files elmctl reads: a file
that is too large, not UTF-8, not JSON, not finite, too deeply nested or of the wrong shape is
refused with one :class:`UnreadableFile` (a UsageError, exit 2) naming the file and the limit,
before anything else looks at it. The limits are far above what real files need:

======================  ============  ===================================================
file                    limit         a real one
======================  ============  ===================================================
recipe YAML             128 KiB       3 KB (PyYAML reads 60-150 KB/s: this bounds parse time)
HF ``config.json``      1 MiB         2 KB (OpenELM-3B)
safetensors index       16 MiB        100 KB
data manifest           64 MiB        ~200 bytes per input file
other small JSON        1 MiB         run options, export info
JSONL input line        64 MiB        a few KB (one document or preference pair)
JSON nesting            64 levels     3
======================  ============  ===================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any

from elmctl.errors import UsageError

__all__ = [
    "sha256_file",
    "sha256_json",
    "UnreadableFile",
    "read_text_bounded",
    "read_json_bounded",
    "loads_json_bounded",
    "human_bytes",
    "json_kind",
    "MAX_RECIPE_BYTES",
    "MAX_CONFIG_JSON_BYTES",
    "MAX_INDEX_JSON_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_SMALL_JSON_BYTES",
    "MAX_JSONL_LINE_BYTES",
    "MAX_JSON_DEPTH",
]

KiB, MiB = 1 << 10, 1 << 20
MAX_RECIPE_BYTES = 128 * KiB
MAX_CONFIG_JSON_BYTES = 1 * MiB
MAX_INDEX_JSON_BYTES = 16 * MiB
MAX_MANIFEST_BYTES = 64 * MiB
MAX_SMALL_JSON_BYTES = 1 * MiB
MAX_JSONL_LINE_BYTES = 64 * MiB
MAX_JSON_DEPTH = 64


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


class UnreadableFile(UsageError):
    """A file elmctl refuses to read: missing, too large, not UTF-8, not JSON, or the wrong shape.

    ``path`` is the file, ``reason`` the problem without the path (for messages that name the file
    their own way, such as a recipe's problem list).
    """

    def __init__(self, path: str | os.PathLike, reason: str, hint: str | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}", hint)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; exact powers print without decimals ('64 MiB')."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def read_text_bounded(path: str | os.PathLike, max_bytes: int, what: str = "file") -> str:
    """The UTF-8 text of ``path``, refusing files over ``max_bytes`` without reading them whole.

    Args:
        path: the file.
        max_bytes: the most bytes a real ``what`` could hold (see the module table).
        what: what the file is, for the message ("recipe", "config.json").

    Raises:
        UnreadableFile: missing or unreadable, larger than ``max_bytes``, or not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # never more, whatever the file (or device) claims
    except OSError as exc:
        raise UnreadableFile(path, f"cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        try:
            size = f"{human_bytes(os.path.getsize(path))}, "
        except OSError:
            size = ""
        raise UnreadableFile(path, f"too large ({size}over the {human_bytes(max_bytes)} limit for a {what}; "
                                   "a real one is far smaller)", "check that this is the right file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(path, f"cannot read it as text: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                             ) from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range (a finite number is needed)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 40:  # 2**64 has 20 digits; Python refuses over 4300 anyway
        raise ValueError(f"integer {text[:20]}... ({len(text)} digits) is out of range")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (a finite number is needed)")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_shape(value: Any, max_depth: int) -> str | None:
    """The first problem of a parsed JSON value (too deep, unpaired surrogate), or None. Iterative."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                return f"nested too deeply (more than {max_depth} levels)"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(k, str) and _SURROGATE.search(k):
                    return f"key {k!r:.60} holding an unpaired surrogate escape (not text)"
                stack.append((v, depth + 1))
        elif isinstance(node, str) and _SURROGATE.search(node):
            return f"string {node!r:.60} holding an unpaired surrogate escape (not text)"
    return None


def loads_json_bounded(text: str, source: str | os.PathLike, *, what: str = "JSON file",
                       expect: type | None = dict, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON strictly: no NaN/Infinity or numbers that overflow, at most ``max_depth`` levels,
    no unpaired surrogates; the top level must be an ``expect`` (None: anything).

    Raises:
        UnreadableFile: naming ``source`` and the problem (with line and column for syntax errors).
    """
    try:
        value = json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UnreadableFile(source, f"not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise UnreadableFile(source, f"nested too deeply (more than {max_depth} levels)") from None
    except ValueError as exc:  # NaN/Infinity, 1e400, an integer of 41+ digits
        raise UnreadableFile(source, f"not valid JSON: {exc}") from None
    problem = _check_shape(value, max_depth)
    if problem:
        raise UnreadableFile(source, problem if problem.startswith("nested") else f"has a {problem}")
    if expect is not None and not isinstance(value, expect):
        raise UnreadableFile(source, f"a {what} must be {json_kind(expect)}, not {json_kind(type(value))}")
    return value


def json_kind(kind: type) -> str:
    """dict -> 'a JSON object {...}', list -> 'an array', ...: a JSON value's type, for messages."""
    names = {dict: "a JSON object {...}", list: "an array [...]", str: "a string", bool: "true/false",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(kind, kind.__name__)


def read_json_bounded(path: str | os.PathLike, max_bytes: int, *, what: str = "JSON file",
                      expect: type | None = dict, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """:func:`read_text_bounded` then :func:`loads_json_bounded`: a JSON file of bounded size and shape.

    Raises:
        UnreadableFile: see both.
    """
    return loads_json_bounded(read_text_bounded(path, max_bytes, what), path, what=what, expect=expect,
                              max_depth=max_depth)
