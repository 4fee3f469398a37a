"""Throughput of `elmctl data prepare` (pretrain shards): MB/s of input and tokens/s.

Generates a ~50 MB JSONL corpus of Zipf-distributed pseudo-words (so BPE has real merges to make),
trains an ~8k HF byte-level BPE tokenizer on a slice of it, then times ``prepare_pretrain`` with the
byte tokenizer and with the BPE tokenizer, at 1 worker and at all cores. Nothing is downloaded.

    .venv/bin/python tests/benchmarks/bench_data_prepare.py            # table
    .venv/bin/python tests/benchmarks/bench_data_prepare.py --mb 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(path: Path, target_mb: float, seed: int = 0) -> int:
    """Write documents of 50-400 Zipf words from a 30k-word synthetic vocabulary; returns bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lengths = rng.integers(2, 11, size=30_000)
    words = ["".join(rng.choice(letters, size=n)) for n in lengths]
    target = int(target_mb * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            n_docs = 2000
            sizes = rng.integers(50, 400, size=n_docs)
            ids = np.minimum(rng.zipf(1.2, size=int(sizes.sum())) - 1, len(words) - 1)
            pos = 0
            lines = []
            for s in sizes:
                text = " ".join(words[i] for i in ids[pos : pos + s]) + "."
                pos += s
                lines.append(json.dumps({"text": text}) + "\n")
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk)
    return written


def train_bpe(corpus: Path, out: Path, vocab_size: int = 8192, sample_bytes: int = 5_000_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        seen = 0
        with open(corpus) as f:
            for line in f:
                seen += len(line)
                if seen > sample_bytes:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(sample(), trainer)
    tok.save(str(out))
    return out


def run(corpus: Path, tokenizer: str, workers: int, out: Path) -> dict:
    from elmctl.data.prepare import prepare_pretrain

    t0 = time.perf_counter()
    r = prepare_pretrain([corpus], out, tokenizer, min_chars=0, min_tokens=0, workers=workers, force=True)
    dt = time.perf_counter() - t0
    m = r.manifest
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    size = corpus.stat().st_size
    return {
        "tokenizer": "byte" if tokenizer == "byte" else f"hf-bpe-{m['vocab_size']}",
        "workers": workers,
        "seconds": round(dt, 2),
        "input_mb": round(size / 1e6, 1),
        "mb_per_s": round(size / 1e6 / dt, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / dt),
        "bytes_per_token": round(size / tokens, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (default 8192)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        t0 = time.perf_counter()
        make_corpus(corpus, args.mb)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        bpe = train_bpe(corpus, tmp / "tokenizer.json", args.vocab)
        t_bpe = time.perf_counter() - t0
        rows = []
        for tok in ("byte", str(bpe)):
            for w in sorted({1, cores}):
                rows.append(run(corpus, tok, w, tmp / "out"))
    result = {"cores": cores, "corpus_seconds": round(t_gen, 1), "bpe_train_seconds": round(t_bpe, 1), "runs": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"data prepare throughput on {cores} cores ({rows[0]['input_mb']} MB JSONL; corpus made in "
          f"{t_gen:.1f}s, BPE trained in {t_bpe:.1f}s)")  # fmt: skip
    head = f"{'tokenizer':<14}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'tokens':>13}{'tokens/s':>12}{'B/tok':>7}"
    print(head)
    for r in rows:
        print(f"{r['tokenizer']:<14}{r['workers']:>8}{r['seconds']:>9.2f}{r['mb_per_s']:>8.2f}"
              f"{r['tokens']:>13,}{r['tokens_per_s']:>12,}{r['bytes_per_token']:>7.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
