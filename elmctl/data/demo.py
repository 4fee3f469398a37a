"""Synthetic demo data, made on the spot (nothing downloaded), deterministic by seed.

One task with a checkable answer that a 4-layer byte model learns within the demo's CPU budget,
and a rule that carries over to prompts it never saw (:data:`KINDS`)::

    What is the larger of 37 and 52?     chosen 52    rejected 37
    What is the smaller of 37 and 52?    chosen 37    rejected 52

Both numbers are in the prompt, so the wrong answer is the plausible mistake (copying the other
one), and since the two kinds ask for opposite choices from the same numbers, neither "take the
first number" nor "take the bigger-looking one" beats chance: a model has to read the question.

- Pre-training corpus (``raw/corpus.jsonl`` -> ``pretrain/``): one question and its right answer
  per document, laid out as the chat template (:mod:`elmctl.data.chat`) lays out a prompt and its
  completion: ``<|user|>\\n{question}\\n<|assistant|>\\n{answer}``. A prepared document is
  ``[BOS] text [EOS]``, so pre-training shows what a DPO pair shows (BOS first, the answer then
  EOS) except the EOS id the template puts after the question, which text cannot hold. The base
  model learns the format and part of the rule; DPO sharpens that.
- Preference pairs (``raw/prefs.jsonl`` -> ``preference/``): the same questions, right answer
  chosen, the other number rejected; each prompt appears once, so the test prompts (the last
  rows, ``split: test``) are never seen in DPO training. Numbers 0..99: 19800 distinct prompts.

Measured on 2 CPU cores (``elmctl demo`` sizes): DPO at lr 1e-3 reaches ~0.9 held-out reward accuracy,
1e-2 collapses to ~0.4, 1e-5 barely moves from what the base already gets right.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

__all__ = ["make_demo", "make_corpus", "make_pairs", "KINDS", "question", "answer"]

KINDS = ("larger", "smaller")
MAX_PROMPTS = len(KINDS) * 100 * 99  # ordered pairs of distinct numbers 0..99, per kind


def question(kind: str, a: int, b: int) -> str:
    return f"What is the {kind} of {a} and {b}?"


def answer(kind: str, a: int, b: int) -> int:
    """The one right answer; the rejected answer of a pair is the other number."""
    return max(a, b) if kind == "larger" else min(a, b)


def _two(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(100), 2)
    return a, b


def make_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """``num_docs`` chat-formatted question/answer documents (about 45 bytes each)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        kind, (a, b) = rng.choice(KINDS), _two(rng)
        docs.append(f"<|user|>\n{question(kind, a, b)}\n<|assistant|>\n{answer(kind, a, b)}")
    return docs


def make_pairs(num_train: int, num_test: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs with ``split`` and ``kind`` fields; each prompt appears once, kinds alternate."""
    if num_train + num_test > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} distinct demo prompts")
    rng = random.Random(seed + 1)
    total = num_train + num_test
    # row i asks kind i % 2 about the next unused (a, b) of that kind: kinds alternate in both
    # splits and no two rows share a prompt
    pool = [(a, b) for a in range(100) for b in range(100) if a != b]
    numbers = {k: iter(rng.sample(pool, (total - j + len(KINDS) - 1) // len(KINDS))) for j, k in enumerate(KINDS)}
    rows = []
    for i in range(total):
        kind = KINDS[i % len(KINDS)]
        a, b = next(numbers[kind])
        right = answer(kind, a, b)
        rows.append({"prompt": question(kind, a, b), "chosen": str(right), "rejected": str(a + b - right),
                     "split": "train" if i < num_train else "test", "kind": kind})
    return rows


EVAL_TASK = "demo_compare"


def write_eval_task(prefs_jsonl: Path, folder: Path) -> Path:
    """A local lm-evaluation-harness task from the held-out (``split: test``) preference pairs.

    Writes ``folder/demo_compare.jsonl`` (question, choices [right, wrong], answer 0) and
    ``folder/demo_compare.yaml``: multiple choice, the corpus's own chat text format as the prompt,
    accuracy = how often the model gives the right number the higher log-likelihood. The pairs are
    the DPO test split, so no question was seen in tuning. Returns ``folder`` (for ``--include-path``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(prefs_jsonl) as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "test":
                rows.append({"question": r["prompt"], "choices": [r["chosen"], r["rejected"]], "answer": 0})
    data = folder / f"{EVAL_TASK}.jsonl"
    _write_jsonl(data, rows)
    # doc_to_text is the pre-training corpus's format; target_delimiter "" puts the answer right after it
    (folder / f"{EVAL_TASK}.yaml").write_text(
        f"task: {EVAL_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "<|user|>\\n{{question}}\\n<|assistant|>\\n"\n'
        'target_delimiter: ""\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return folder


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
    from elmctl.data.prepare import prepare_pretrain

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
