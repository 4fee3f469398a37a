"""Synthetic demo data, made on the spot (nothing downloaded), deterministic by seed.

- Pre-training corpus (``raw/corpus.jsonl`` -> ``pretrain/``): documents mixing correct addition
  facts (``17 + 25 = 42.``, ``What is 17 + 25? 42.``), sentences from a small grammar (``the red
  fox sees a quiet dog.``) and counting runs (``count: 4 5 6 7.``). The structure is learnable, the
  random choices are not, so a small model ends well below the unigram entropy (recorded in the
  manifest as ``unigram_entropy_nats``) but not at zero.
- Preference pairs (``raw/prefs.jsonl`` -> ``preference/``): ``What is a + b?`` with the right sum
  chosen and a plausible wrong one rejected (off by 1, 2 or 10). Operands 0..99, each prompt used
  once; train and test prompts are disjoint. The corpus teaches addition in the same words, so a
  pre-trained model starts with a prior that DPO can sharpen, and test accuracy measures it.

Sized for the ``tiny`` recipe (byte tokenizer, context 256): about 3 MB of text by default.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

__all__ = ["make_demo", "make_corpus", "make_pairs"]

_ADJ = "red blue green small big quiet loud old young happy tired clever".split()
_NOUN = "fox dog cat bird horse mouse owl fish bear frog wolf duck".split()
_VERB = "sees likes follows finds helps watches chases greets".split()
_DET = ("the", "a")
_WRONG_BY = (-10, -2, -1, 1, 2, 10)


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} + {b}? {a + b}." if rng.random() < 0.5 else f"{a} + {b} = {a + b}."
    if kind < 0.85:
        d1, d2 = rng.choice(_DET), rng.choice(_DET)
        return f"{d1} {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {d2} {rng.choice(_ADJ)} {rng.choice(_NOUN)}."
    start, n = rng.randrange(90), rng.randrange(3, 8)
    return "count: " + " ".join(str(start + i) for i in range(n)) + "."


def make_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """``num_docs`` documents of 8-15 sentences each (about 380 bytes per document)."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(8, 15))) for _ in range(num_docs)]


def make_pairs(num_train: int, num_test: int, seed: int = 0) -> list[dict[str, Any]]:
    """Addition preference pairs with a ``split`` field; each (a, b) prompt appears once."""
    if num_train + num_test > 10_000:
        raise ValueError("at most 10000 distinct addition prompts (operands 0..99)")
    rng = random.Random(seed + 1)
    operands = rng.sample([(a, b) for a in range(100) for b in range(100)], num_train + num_test)
    rows = []
    for i, (a, b) in enumerate(operands):
        right = a + b
        wrong = right + rng.choice([d for d in _WRONG_BY if right + d >= 0])
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": str(right),
                "rejected": str(wrong),
                "split": "train" if i < num_train else "test",
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def make_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_docs: int = 8000,
    num_pairs: int = 2000,
    num_test_pairs: int = 200,
) -> dict[str, Any]:
    """Write ``out/raw/{corpus,prefs}.jsonl`` and prepare ``out/pretrain/`` and ``out/preference/``.

    Returns:
        ``{"out_dir", "pretrain": manifest, "preference": manifest, "up_to_date": bool}``. A re-run
        with the same arguments rewrites identical raw files and leaves the prepared folders alone.
    """
    from elmctl.data.preference import prepare_preference
    from elmctl.data.shards import prepare_pretrain

    out = Path(out_dir).expanduser()
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _write_jsonl(raw / "corpus.jsonl", [{"text": t} for t in make_corpus(num_docs, seed)])
    _write_jsonl(raw / "prefs.jsonl", make_pairs(num_pairs, num_test_pairs, seed))
    pre = prepare_pretrain([raw / "corpus.jsonl"], out / "pretrain", "byte", recipe="tiny", val_fraction=0.02, workers=1)
    pref = prepare_preference([raw / "prefs.jsonl"], out / "preference", "byte", recipe="tiny")
    return {
        "out_dir": str(out),
        "pretrain": pre.manifest,
        "preference": pref.manifest,
        "up_to_date": pre.up_to_date and pref.up_to_date,
    }
