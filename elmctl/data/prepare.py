"""``prepare_pretrain``: stream inputs -> filter -> tokenise (all cores) -> shards + manifest.

Order and determinism: batches are tokenised by a process pool but consumed strictly in input
order, so the shards are byte-identical whatever ``workers`` is. At most ``2 x workers`` batches
(about 1 MiB of text each) are in flight, which bounds memory for inputs of any size.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from elmctl.data import _manifest as mf
from elmctl.data._readers import Batch, input_format, iter_batches, parse_batch
from elmctl.data.shards import ShardWriter
from elmctl.data.tokenizers import check_vocab, load_tokenizer, token_dtype
from elmctl.errors import UsageError

__all__ = ["prepare_pretrain", "PrepareResult", "doc_fraction"]

ProgressFn = Callable[[int, int, int], None]  # (bytes done, bytes total, tokens written)


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool  # True: nothing was done, the folder already matched inputs and options


def doc_fraction(text: str) -> float:
    """A stable number in [0, 1) from a text: the split key (same text -> same split, any machine)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# --- worker side -------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(spec: str, opts: dict[str, Any], in_pool: bool = True) -> None:
    if in_pool:  # the pool is the parallelism; in-process, HF tokenizers may use its own threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W["tok"] = load_tokenizer(spec)
    _W.update(opts)


def _work(batch: Batch) -> tuple:
    """Tokenise one batch -> ("ok", train ids, train docs, val ids, val docs, dropped) or ("error", ...)."""
    tok = _W["tok"]
    try:
        texts = parse_batch(batch, _W["text_key"])
    except UsageError as exc:
        return ("error", exc.message, exc.hint)
    dropped = {"too_few_chars": 0, "too_few_tokens": 0}
    kept = [t for t in texts if len(t) >= _W["min_chars"]]
    dropped["too_few_chars"] = len(texts) - len(kept)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    bos = [tok.bos_id] if tok.bos_id is not None else []
    head, tail = np.array(bos, dtype=np.int64), np.array([tok.eos_id], dtype=np.int64)
    for text, ids in zip(kept, tok.encode_batch(kept) if kept else []):
        if len(ids) < _W["min_tokens"]:
            dropped["too_few_tokens"] += 1
            continue
        split = "val" if doc_fraction(text) < _W["val_fraction"] else "train"
        parts[split].extend((head, ids, tail))
    dtype = _W["dtype"]
    out = []
    for split in ("train", "val"):
        arr = np.concatenate(parts[split]).astype(dtype) if parts[split] else np.empty(0, dtype)
        out += [arr, len(parts[split]) // 3]
    return ("ok", *out, dropped)


# --- parent side -------------------------------------------------------------------------------
def _results(batches, workers: int, spec: str, opts: dict[str, Any]):
    """Yield (batch, result) in input order, tokenising on ``workers`` processes."""
    if workers <= 1:
        _init_worker(spec, opts, in_pool=False)
        for b in batches:
            yield b, _work(b)
        return
    # fork is fast and the parent holds no threads here; elsewhere fall back to spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec, opts))
    pending: deque = deque()
    try:
        for b in batches:
            pending.append((b, pool.apply_async(_work, (b,))))
            if len(pending) >= 2 * workers:
                b0, r0 = pending.popleft()
                yield b0, r0.get()
        while pending:
            b0, r0 = pending.popleft()
            yield b0, r0.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _resolve_filters(recipe, min_chars: int | None, min_tokens: int | None) -> tuple[int, int]:
    filters = recipe.pretrain.data_filters if recipe is not None else None
    if min_chars is None:
        min_chars = filters.min_chars if filters else 200
    if min_tokens is None:
        min_tokens = filters.min_tokens if filters else 256
    if min_chars < 0 or min_tokens < 0:
        raise UsageError("--min-chars and --min-tokens must be >= 0")
    return min_chars, min_tokens


def prepare_pretrain(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str = "byte",
    *,
    recipe: Any = None,
    text_key: str = "text",
    min_chars: int | None = None,
    min_tokens: int | None = None,
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    txt_split: str = "file",
    force: bool = False,
    batch_bytes: int = 1 << 20,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Tokenise text inputs into flat token shards plus ``manifest.json`` (see :mod:`shards`).

    Args:
        inputs: .txt / .jsonl / .jsonl.gz / .parquet files, read in this order.
        recipe: a Recipe (or id): checks the tokenizer fits and supplies default filters.
        min_chars, min_tokens: drop shorter documents (default: the recipe's, else 200 and 256).
        val_fraction: share of documents (chosen by text hash) held out as ``val``.
        txt_split: ``file`` (a .txt file is one document) or ``lines`` (each non-empty line is one).
        force: rebuild even when the manifest says the folder is up to date; write into a
            non-empty folder without an elmctl manifest (its files are left alone), or over
            another kind of prepared data.
        progress: called as ``progress(bytes_done, bytes_total, tokens_written)``.

    Raises:
        UsageError: unreadable, empty or corrupt input (file and line named); nothing left after
            the filters; a tokenizer larger than the recipe's vocabulary; an ``out_dir`` that is a
            file, or holds files elmctl did not write (see :class:`~elmctl.data._manifest.OutputFolder`).
            No manifest is written.
    """
    if recipe is not None and isinstance(recipe, (str, os.PathLike)):
        from elmctl.config import load_recipe

        recipe = load_recipe(recipe)
    if not inputs:
        raise UsageError("no inputs given", "pass one or more .txt/.jsonl/.jsonl.gz/.parquet files")
    paths = [Path(p).expanduser() for p in inputs]
    out = Path(out_dir).expanduser()
    mf.check_out_dir(out)
    for p in paths:
        input_format(p)
        if not p.is_file():
            raise UsageError(f"input not found: {p}")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UsageError("--shard-tokens must be positive")
    if txt_split not in ("file", "lines"):
        raise UsageError(f"--txt-split must be file or lines, got {txt_split!r}")
    tok = load_tokenizer(tokenizer)
    if recipe is not None:
        check_vocab(tok, recipe)
    min_chars, min_tokens = _resolve_filters(recipe, min_chars, min_tokens)
    dtype = token_dtype(tok.vocab_size)
    options = {
        "text_key": text_key, "min_chars": min_chars, "min_tokens": min_tokens, "val_fraction": val_fraction,
        "shard_tokens": shard_tokens, "txt_split": txt_split,
    }  # fmt: skip
    old = mf.read_manifest(out) if out.is_dir() else None
    old = old if mf.is_elmctl_manifest(old) else None  # someone else's manifest.json: not ours to read
    described = mf.describe_inputs(paths, old)
    fingerprint = mf.build_fingerprint("pretrain", tok.fingerprint, options, described)
    if not force and out.is_dir() and mf.is_up_to_date(out, old, fingerprint):
        return PrepareResult(out, old, True)

    folder = mf.OutputFolder.claim(out, "pretrain", ("train", "val"), force=force)
    workers = max(1, workers or os.cpu_count() or 1)
    opts = {**options, "dtype": dtype}
    writers = {s: ShardWriter(out, s, dtype, shard_tokens, folder.add) for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    dropped = {"too_few_chars": 0, "too_few_tokens": 0}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    total_bytes = sum(d["size"] for d in described)
    done_before, t0 = 0, time.perf_counter()

    done_of: dict[int, int] = {}  # id(batch) -> input bytes read once it is done (for progress)

    def batches():
        nonlocal done_before
        for path, d in zip(paths, described):
            seen = 0
            for b in iter_batches(path, text_key, txt_split, batch_bytes):
                # gzip/parquet batches count decoded bytes: clamp to the file size (approximate)
                seen += b.num_bytes
                done_of[id(b)] = done_before + min(seen, d["size"])
                yield b
            done_before += d["size"]

    try:
        for b, res in _results(batches(), workers, tok.spec, opts):
            if res[0] == "error":
                raise UsageError(res[1], res[2])
            _, train_ids, n_train, val_ids, n_val, drop = res
            writers["train"].write(train_ids)
            writers["val"].write(val_ids)
            counts += np.bincount(train_ids, minlength=tok.vocab_size)[: tok.vocab_size]
            docs["train"] += n_train
            docs["val"] += n_val
            for k, v in drop.items():
                dropped[k] += v
            if progress is not None:
                progress(done_of.pop(id(b)), total_bytes, writers["train"].num_tokens + writers["val"].num_tokens)
        for w in writers.values():
            w.close()
        if docs["train"] == 0:
            raise UsageError(
                f"no training documents left: {sum(dropped.values()) + docs['val']} read, "
                f"{dropped['too_few_chars']} under {min_chars} characters, "
                f"{dropped['too_few_tokens']} under {min_tokens} tokens, {docs['val']} held out",
                "lower --min-chars/--min-tokens (or --val-fraction), or add longer documents",
            )
    except BaseException:
        for w in writers.values():
            w.abort()
        folder.release()
        raise

    p = counts[counts > 0] / counts.sum()
    files = writers["train"].files + writers["val"].files
    manifest = {
        "kind": "pretrain",
        "format_version": mf.FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": tok.spec,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "recipe": getattr(recipe, "id", None),
        "options": options,
        "document_format": "[BOS] tokens [EOS] per document, concatenated" if tok.bos_id is not None
        else "tokens [EOS] per document, concatenated",
        "splits": {
            s: {"tokens": writers[s].num_tokens, "documents": docs[s], "shards": len(writers[s].files)}
            for s in ("train", "val")
        },
        "dropped": dropped,
        "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
        "files": files,
        "inputs": described,
    }
    folder.commit(manifest)
    return PrepareResult(out, manifest, False)

