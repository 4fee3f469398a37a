"""Streaming readers for ``data prepare`` inputs: .txt, .jsonl, .jsonl.gz, .parquet.

Inputs are read in batches of about ``batch_bytes`` so memory stays bounded whatever the file size.
JSON lines travel to the worker processes still raw (bytes) and are parsed there, so the parent
process only does I/O. Every error names the file and, where there is one, the line (or parquet row).

.txt files: one document per file by default (a plain-text book is one document); with
``txt_split="lines"`` every non-empty line is a document.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from elmctl._files import MAX_JSONL_LINE_BYTES, human_bytes
from elmctl.errors import UsageError

__all__ = ["Batch", "SUFFIXES", "input_format", "iter_batches", "parse_batch", "iter_records"]

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class Batch:
    """Documents from one file: ``raw`` JSON lines (bytes) or ready ``text`` items (str)."""

    path: str
    kind: str  # "json" | "text"
    lines: list[int]  # 1-based line (or parquet row) number of each item
    items: list
    num_bytes: int


def input_format(path: Path) -> str:
    """The input's format from its name, or a UsageError listing the supported ones."""
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if name.endswith(suffix):
            return suffix
    if name.endswith(".json.gz") or name.endswith(".json"):
        return ".jsonl.gz" if name.endswith(".gz") else ".jsonl"
    raise UsageError(f"{path}: unsupported input type", f"supported: {', '.join(SUFFIXES)}")


def _open_lines(path: Path, fmt: str):
    return gzip.open(path, "rb") if fmt == ".jsonl.gz" else open(path, "rb")


def iter_batches(
    path: Path, text_key: str = "text", txt_split: str = "file", batch_bytes: int = 1 << 20
) -> Iterator[Batch]:
    """Yield batches of one input file, in order. Raises UsageError on unreadable/empty input."""
    fmt = input_format(path)
    if not path.is_file():
        raise UsageError(f"input not found: {path}")
    if fmt == ".parquet":
        yield from _parquet_batches(path, text_key, batch_bytes)
        return
    if fmt == ".txt" and txt_split == "file":
        with open(path, "rb") as f:
            data = f.read(MAX_JSONL_LINE_BYTES + 1)
        if len(data) > MAX_JSONL_LINE_BYTES:
            raise UsageError(f"{path}: one document of over {human_bytes(MAX_JSONL_LINE_BYTES)} (the limit per "
                             "document)", "split it, or pass --txt-split lines to read one document per line")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text ({exc})") from exc
        if not text.strip():
            raise UsageError(f"{path}: input is empty", "remove it from the inputs")
        yield Batch(str(path), "text", [1], [text], len(data))
        return
    items: list = []
    lines: list[int] = []
    size = 0
    seen = 0
    lineno = 0
    try:
        with _open_lines(path, fmt) as f:
            # readline(limit): a file with no newline is refused at the limit, never read whole
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), 1):
                if len(line) > MAX_JSONL_LINE_BYTES and not line.endswith(b"\n"):
                    raise UsageError(f"{path}:{lineno}: line longer than {human_bytes(MAX_JSONL_LINE_BYTES)} "
                                     "(the limit per line: one document or record)",
                                     "check that this is a text or JSON-lines file; split very long documents")
                if not line.strip():
                    continue
                lines.append(lineno)
                if fmt == ".txt":
                    try:
                        items.append(line.decode("utf-8").rstrip("\r\n"))
                    except UnicodeDecodeError as exc:
                        raise UsageError(f"{path}:{lineno}: not UTF-8 text ({exc})") from exc
                    kind = "text"
                else:
                    items.append(line)
                    kind = "json"
                size += len(line)
                seen += 1
                if size >= batch_bytes:
                    yield Batch(str(path), kind, lines, items, size)
                    items, lines, size = [], [], 0
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"{path}: cannot read (corrupt gzip?) near line {lineno + 1}: {exc}") from exc
    if items:
        yield Batch(str(path), "text" if fmt == ".txt" else "json", lines, items, size)
    if seen == 0:
        raise UsageError(f"{path}: input is empty (no non-blank lines)", "remove it from the inputs")


def _parquet_batches(path: Path, text_key: str, batch_bytes: int) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dev dependency
        raise UsageError("reading .parquet needs pyarrow", "pip install 'elmctl[parquet]'") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if text_key not in names:
        raise UsageError(f"{path}: no column {text_key!r} (columns: {', '.join(names)})", "pass --text-key NAME")
    if pf.metadata.num_rows == 0:
        raise UsageError(f"{path}: input is empty (0 rows)", "remove it from the inputs")
    row = 1
    for rb in pf.iter_batches(batch_size=4096, columns=[text_key]):
        texts = rb.column(0).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UsageError(f"{path}: row {row + i}: {text_key!r} is {type(t).__name__}, not a string")
        yield Batch(str(path), "text", list(range(row, row + len(texts))), texts, rb.nbytes)
        row += len(texts)


def _may_hold_surrogates(raw: bytes) -> bool:
    """Cheap pre-check: only a ``\\uD800``-``\\uDFFF`` escape can put a lone surrogate in parsed JSON."""
    return b"\\ud" in raw or b"\\uD" in raw


def _unicode_problem(value: Any, field: str) -> str | None:
    """None, or where ``value`` (a JSON value) holds a string that is not valid Unicode and why."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            return (f"{field} is not valid Unicode: a lone surrogate U+{ord(char):04X} at character {exc.start} "
                    "(a \\uD800-\\uDFFF escape without its pair)")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{field}.{key}" if isinstance(key, str) else f"{field}[{key}]"
        found = _unicode_problem(item, sub)
        if found:
            return found
    return None


_UNICODE_HINT = "fix or remove that record: text must be valid Unicode"


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split("; use sys.")[0]  # Python's advice on its integer-digit limit is not for users


def parse_batch(batch: Batch, text_key: str) -> list[str]:
    """Texts of a batch (parses JSON lines). Raises UsageError naming file and line."""
    if batch.kind == "text":
        return batch.items
    texts = []
    for line, raw in zip(batch.lines, batch.items):
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4301+ digits, deep nesting
            raise UsageError(f"{batch.path}:{line}: bad JSON ({_json_problem(exc)})") from None
        if not isinstance(obj, dict) or text_key not in obj:
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise UsageError(f"{batch.path}:{line}: no {text_key!r} key (has: {keys})", "pass --text-key NAME")
        text = obj[text_key]
        if not isinstance(text, str):
            raise UsageError(f"{batch.path}:{line}: {text_key!r} is {type(text).__name__}, not a string")
        if _may_hold_surrogates(raw):
            problem = _unicode_problem(text, repr(text_key))
            if problem:
                raise UsageError(f"{batch.path}:{line}: {problem}", _UNICODE_HINT)
        texts.append(text)
    return texts


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_or_row, record)`` from a .jsonl/.jsonl.gz/.parquet file of JSON objects."""
    fmt = input_format(path)
    if fmt == ".txt":
        raise UsageError(f"{path}: preference data must be .jsonl, .jsonl.gz or .parquet")
    if fmt == ".parquet":
        for batch in _parquet_record_batches(path):
            yield from batch
        return
    for b in iter_batches(path, txt_split="lines"):
        for line, raw in zip(b.lines, b.items):
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # as in parse_batch
                raise UsageError(f"{path}:{line}: bad JSON ({_json_problem(exc)})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            if _may_hold_surrogates(raw):
                problem = next(filter(None, (_unicode_problem(v, k) for k, v in obj.items())), None)
                if problem:
                    raise UsageError(f"{path}:{line}: {problem}", _UNICODE_HINT)
            yield line, obj


def _parquet_record_batches(path: Path) -> Iterator[list[tuple[int, dict]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable parquet file ({exc})") from exc
    if pf.metadata.num_rows == 0:
        raise UsageError(f"{path}: input is empty (0 rows)")
    row = 1
    for rb in pf.iter_batches(batch_size=1024):
        recs = rb.to_pylist()
        yield [(row + i, r) for i, r in enumerate(recs)]
        row += len(recs)
