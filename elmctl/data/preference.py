"""Preference (DPO) and SFT pairs: prepare, load, collate.

Inputs (.jsonl, .jsonl.gz or .parquet), one pair per record, in any of these layouts:

- ``{"prompt": str, "chosen": str, "rejected": str}`` - the prompt becomes one user turn;
- UltraFeedback-binarised: ``chosen``/``rejected`` are message lists ``[{role, content}, ...]``; the
  prompt is every message but the last assistant one, the completions are those last messages;
- TRL conversational: ``prompt`` a message list, ``chosen``/``rejected`` one-message lists;
- ``--kind sft``: ``{"prompt": str, "completion": str}`` or ``{"messages": [...]}`` (last message the
  answer), or any preference record (its chosen answer). SFT pairs have empty ``rejected_ids``.

Prompts go through the chat template (:mod:`elmctl.data.chat`). Truncation follows TRL's
DPOTrainer: if prompt + longer completion exceeds ``max_length``, the prompt is cut to
``max_prompt_length`` (``keep_end``, TRL's default: its start is dropped, but BOS stays first);
if still too long, completions are cut to ``max_length - len(prompt)`` and keep their final EOS.

Split: a record's ``split`` field when present and not null (a string naming either "test" or
"train", any case: ``test``, ``test_prefs``, ``train_sft``...; anything else is an error naming the
file and line), otherwise a hash of the prompt text (so all pairs of one prompt land in the same split).

Layout: ``{split}-00000.bin`` (all token ids of the split, dtype in the manifest) and
``{split}-index.npy`` (int64 ``[N, 4]``: offset, prompt_len, chosen_len, rejected_len; a pair's
tokens are prompt, chosen, rejected back to back). The loss masks follow from the lengths and
are built by :func:`collate_pairs` / :func:`collate_sft`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from elmctl.data import IGNORE_INDEX
from elmctl.data import _manifest as mf
from elmctl.data._readers import iter_records
from elmctl.data.chat import TEMPLATE_NAME, encode_chat, encode_completion, format_prompt
from elmctl.data.prepare import PrepareResult, doc_fraction
from elmctl.data.shards import ShardWriter
from elmctl.data.tokenizers import check_vocab, load_tokenizer, token_dtype
from elmctl.errors import UsageError

__all__ = ["PreferencePair", "prepare_preference", "load_pairs", "collate_pairs", "collate_sft", "truncate_pair"]


@dataclass(frozen=True)
class PreferencePair:
    """Token ids of one pair (int64 arrays). Completions end with EOS; ``rejected_ids`` is empty for SFT."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray


def _messages(where: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UsageError(f"{where}: expected a list of {{role, content}} messages")
    return value


def _last_answer(where: str, msgs: list[dict]) -> str:
    if not msgs or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
        raise UsageError(f"{where}: the last message must be an assistant message with string content")
    return msgs[-1]["content"]


def parse_record(rec: dict, where: str, kind: str) -> tuple[list[dict], str, str | None]:
    """``(prompt messages, chosen text, rejected text or None)`` from any supported layout."""
    if kind == "sft" and "chosen" not in rec:
        if "messages" in rec:
            msgs = _messages(f"{where}: 'messages'", rec["messages"])
            return msgs[:-1], _last_answer(where, msgs), None
        if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            return [{"role": "user", "content": rec["prompt"]}], rec["completion"], None
        raise UsageError(f"{where}: SFT records need 'prompt'+'completion' strings or 'messages' (has: {', '.join(rec)})")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise UsageError(f"{where}: missing key(s) {', '.join(missing)} (has: {', '.join(rec)})")
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if isinstance(chosen, list):
        c_msgs = _messages(f"{where}: 'chosen'", chosen)
        r_msgs = _messages(f"{where}: 'rejected'", rejected)
        c_text, r_text = _last_answer(where + " (chosen)", c_msgs), _last_answer(where + " (rejected)", r_msgs)
        if isinstance(prompt, list):
            p_msgs = _messages(f"{where}: 'prompt'", prompt)
        elif len(c_msgs) > 1:
            p_msgs = c_msgs[:-1]  # UltraFeedback: the conversation before the last answer
        elif isinstance(prompt, str):
            p_msgs = [{"role": "user", "content": prompt}]
        else:
            raise UsageError(f"{where}: no prompt: 'chosen' has one message and there is no 'prompt'")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, list):
            p_msgs = _messages(f"{where}: 'prompt'", prompt)
        elif isinstance(prompt, str):
            p_msgs = [{"role": "user", "content": prompt}]
        else:
            raise UsageError(f"{where}: missing 'prompt' string")
        c_text, r_text = chosen, rejected
    else:
        raise UsageError(f"{where}: 'chosen'/'rejected' must both be strings or both message lists")
    return p_msgs, c_text, (None if kind == "sft" else r_text)


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int, max_prompt_length: int,
    bos_id: int | None, eos_id: int, mode: str = "keep_end",
) -> tuple[list[int], list[int], list[int], bool]:  # fmt: skip
    """TRL-style truncation; returns the three id lists and whether anything was cut."""
    longer = max(len(chosen), len(rejected))
    cut = False
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        cut = True
        if mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos_id is not None and prompt and prompt[0] == bos_id:
            prompt = [bos_id] + prompt[len(prompt) - (max_prompt_length - 1) :]
        else:
            prompt = prompt[-max_prompt_length:]
    limit = max_length - len(prompt)
    if longer > limit:
        cut = True
        chosen = chosen if len(chosen) <= limit else chosen[: limit - 1] + [eos_id]
        rejected = rejected if len(rejected) <= limit else rejected[: limit - 1] + [eos_id]
    return prompt, chosen, rejected, cut


def _split_of(rec: dict, prompt_text: str, test_fraction: float, where: str) -> str:
    value = rec.get("split")
    if value is None:
        return "test" if doc_fraction(prompt_text) < test_fraction else "train"
    if isinstance(value, str):
        is_test, is_train = "test" in value.lower(), "train" in value.lower()
        if is_test != is_train:
            return "test" if is_test else "train"
    raise UsageError(
        f"{where}: unknown split {json.dumps(value)} (expected a value containing either \"train\" or \"test\", "
        "such as train, test, train_prefs, test_prefs)",
        "rename the split values, or drop the field (or set it to null) to split by prompt hash (--test-fraction)",
    )


def prepare_preference(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str = "byte",
    *,
    recipe: Any = None,
    kind: str = "preference",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    test_fraction: float = 0.05,
    truncation_mode: str = "keep_end",
    force: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> PrepareResult:
    """Tokenise preference (or SFT) records into ``{split}`` arrays plus ``manifest.json``.

    ``max_length``/``max_prompt_length`` default to the recipe's instruct values, else 1024/512.

    ``force`` rebuilds an up-to-date folder, writes into a non-empty folder without an elmctl
    manifest (its files are left alone), or replaces another kind of prepared data.

    Raises:
        UsageError: bad/empty input (file and line named: bad JSON, text that is not valid Unicode,
            an unknown ``split`` value), bad lengths, tokenizer too large, an ``out_dir`` that is a
            file or holds files elmctl did not write (see :class:`~elmctl.data._manifest.OutputFolder`).
    """
    if kind not in ("preference", "sft"):
        raise UsageError(f"unknown kind {kind!r} for pair data", "use preference or sft")
    if isinstance(recipe, (str, os.PathLike)):
        from elmctl.config import load_recipe

        recipe = load_recipe(recipe)
    if not inputs:
        raise UsageError("no inputs given", "pass one or more .jsonl/.jsonl.gz/.parquet files")
    ins = recipe.instruct if recipe is not None else None
    max_length = max_length or (ins.max_length if ins else 1024)
    max_prompt_length = max_prompt_length or (ins.max_prompt_length if ins else 512)
    if not 1 <= max_prompt_length < max_length:
        raise UsageError(f"need 1 <= --max-prompt-length < --max-length, got {max_prompt_length} and {max_length}")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise UsageError(f"truncation mode must be keep_end or keep_start, got {truncation_mode!r}")
    if not 0 <= test_fraction < 1:
        raise UsageError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    paths = [Path(p).expanduser() for p in inputs]
    out = Path(out_dir).expanduser()
    mf.check_out_dir(out)
    for p in paths:
        if not p.is_file():
            raise UsageError(f"input not found: {p}")
    tok = load_tokenizer(tokenizer)
    if recipe is not None:
        check_vocab(tok, recipe)
    dtype = token_dtype(tok.vocab_size)
    options = {
        "max_length": max_length, "max_prompt_length": max_prompt_length, "test_fraction": test_fraction,
        "truncation_mode": truncation_mode, "template": TEMPLATE_NAME,
    }  # fmt: skip
    old = mf.read_manifest(out) if out.is_dir() else None
    old = old if mf.is_elmctl_manifest(old) else None  # someone else's manifest.json: not ours to read
    described = mf.describe_inputs(paths, old)
    fingerprint = mf.build_fingerprint(kind, tok.fingerprint, options, described)
    if not force and out.is_dir() and mf.is_up_to_date(out, old, fingerprint):
        return PrepareResult(out, old, True)
    folder = mf.OutputFolder.claim(out, kind, ("train", "test"), force=force)
    writers = {s: ShardWriter(out, s, dtype, 1 << 62, folder.add) for s in ("train", "test")}
    index: dict[str, list[tuple[int, int, int, int]]] = {"train": [], "test": []}
    stats = {"read": 0, "truncated": 0, "dropped_identical": 0}
    total = sum(d["size"] for d in described)
    try:
        for path in paths:
            empty = True
            for line, rec in iter_records(path):
                empty = False
                stats["read"] += 1
                where = f"{path}:{line}"
                p_msgs, c_text, r_text = parse_record(rec, where, kind)
                if r_text is not None and r_text == c_text:
                    stats["dropped_identical"] += 1
                    continue
                try:
                    prompt = encode_chat(tok, p_msgs)
                except UsageError as exc:
                    raise UsageError(f"{where}: {exc.message}", exc.hint) from exc
                chosen = encode_completion(tok, c_text)
                rejected = encode_completion(tok, r_text) if r_text is not None else []
                prompt, chosen, rejected, cut = truncate_pair(
                    prompt, chosen, rejected, max_length=max_length, max_prompt_length=max_prompt_length,
                    bos_id=tok.bos_id, eos_id=tok.eos_id, mode=truncation_mode,
                )  # fmt: skip
                stats["truncated"] += int(cut)
                split = _split_of(rec, format_prompt(p_msgs), test_fraction, where)
                w = writers[split]
                index[split].append((w.num_tokens, len(prompt), len(chosen), len(rejected)))
                w.write(np.asarray(prompt + chosen + rejected, dtype=np.int64))
                if progress is not None and stats["read"] % 1000 == 0:
                    progress(0, total, sum(x.num_tokens for x in writers.values()))
            if empty:
                raise UsageError(f"{path}: input is empty", "remove it from the inputs")
        if not index["train"]:
            raise UsageError(f"no training pairs: {stats['read']} read, {len(index['test'])} in the test split")
        for w in writers.values():
            w.close()
        files = writers["train"].files + writers["test"].files
        for split in ("train", "test"):
            arr = np.asarray(index[split], dtype=np.int64).reshape(-1, 4)
            buf = io.BytesIO()
            np.save(buf, arr)
            data = buf.getvalue()
            name = f"{split}-index.npy"
            folder.add(name)
            tmp = out / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            files.append({"name": name, "split": split, "pairs": len(arr), "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    except BaseException:
        for w in writers.values():
            w.abort()
        folder.release()
        raise
    manifest = {
        "kind": kind,
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
        "layout": "{split}-00000.bin: prompt+chosen+rejected ids per pair; {split}-index.npy: "
        "[offset, prompt_len, chosen_len, rejected_len]",
        "splits": {s: {"pairs": len(index[s]), "tokens": writers[s].num_tokens} for s in ("train", "test")},
        **stats,
        "files": files,
        "inputs": described,
    }
    folder.commit(manifest)
    return PrepareResult(out, manifest, False)


def _pair_dir(root: str | os.PathLike) -> Path:
    try:
        return mf.resolve_data_dir(root, "preference")
    except UsageError:
        if mf.read_manifest(Path(root)) and mf.read_manifest(Path(root)).get("kind") == "sft":
            return Path(root)
        raise


def load_pairs(root: str | os.PathLike, split: str = "train") -> list[PreferencePair]:
    """All pairs of a split of a prepared preference (or SFT) folder, as int64 array views."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}", "use train or test")
    folder = _pair_dir(root)
    m = mf.read_manifest(folder) or {}
    index = np.load(folder / f"{split}-index.npy")
    tokens_path = folder / f"{split}-00000.bin"
    tokens = np.fromfile(tokens_path, dtype=np.dtype(m["dtype"])).astype(np.int64) if len(index) else np.empty(0, np.int64)
    pairs = []
    for off, p, c, r in index.tolist():
        pairs.append(
            PreferencePair(tokens[off : off + p], tokens[off + p : off + p + c], tokens[off + p + c : off + p + c + r])
        )
    return pairs


def _rows(prompts: list[np.ndarray], completions: list[np.ndarray], pad_id: int) -> dict:
    """Right-padded next-token rows: input = (prompt+completion)[:-1], label = next token on completion."""
    import torch

    seqs = [np.concatenate([p, c]) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs) - 1
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        n = len(s) - 1
        input_ids[i, :n] = s[:-1]
        # position t predicts s[t+1]; only completion tokens (index >= len(prompt)) are scored
        labels[i, len(p) - 1 : n] = s[len(p) :]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict:
    """DPO batch: rows 0..B-1 chosen, B..2B-1 rejected; ``input_ids``/``labels`` LongTensor[2B, L].

    ``labels[:, t]`` is the token position ``t`` must predict, -100 on prompt and padding.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    if any(len(p.rejected_ids) == 0 for p in pairs):
        raise UsageError("these pairs have no rejected answers (SFT data)", "use SFT, or prepare --kind preference")
    prompts = [p.prompt_ids for p in pairs]
    return _rows(prompts * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id)


def collate_sft(pairs: Sequence[PreferencePair], pad_id: int) -> dict:
    """SFT batch on the chosen answers: ``input_ids``/``labels`` LongTensor[B, L], -100 on prompt/pad."""
    if not pairs:
        raise ValueError("collate_sft needs at least one pair")
    return _rows([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], pad_id)
