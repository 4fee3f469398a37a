"""Synthetic demo data: determinism, sizes, correct/incorrect answers, disjoint splits, speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from elmctl.cli.main import main
from elmctl.data.demo import make_demo, make_pairs
from elmctl.data.preference import load_pairs
from elmctl.data.shards import TokenDataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    result = make_demo(out, seed=0)
    return out, result, time.perf_counter() - t0


def test_fast_and_sized_for_tiny(demo):
    out, r, seconds = demo
    assert seconds < 15
    corpus_bytes = (out / "raw" / "corpus.jsonl").stat().st_size
    assert 2_000_000 <= corpus_bytes <= 4_000_000
    pre = r["pretrain"]
    assert pre["kind"] == "pretrain" and pre["tokenizer"] == "byte" and pre["recipe"] == "tiny"
    assert pre["splits"]["train"]["tokens"] > 1_500_000 and pre["splits"]["val"]["tokens"] > 10_000
    pref = r["preference"]["splits"]
    assert pref["train"]["pairs"] == 2000 and pref["test"]["pairs"] == 200


def test_unigram_entropy_recorded(demo):
    out, r, _ = demo
    ds = TokenDataset(out, "train")
    counts = np.bincount(ds.read(0, ds.num_tokens), minlength=259)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    assert r["pretrain"]["unigram_entropy_nats"] == pytest.approx(h)
    assert 2.5 < h < 4.0  # far above what a model that learns the templates reaches


def test_corpus_has_correct_arithmetic(demo):
    out, _, _ = demo
    import re

    text = " ".join(json.loads(line)["text"] for line in open(out / "raw" / "corpus.jsonl"))
    facts = re.findall(r"(\d+) \+ (\d+) (?:= |\? )(\d+)\.", text)
    assert len(facts) > 10_000
    assert all(int(a) + int(b) == int(c) for a, b, c in facts)


def test_pairs_are_checkable_and_splits_disjoint(demo):
    out, _, _ = demo
    rows = [json.loads(line) for line in open(out / "raw" / "prefs.jsonl")]
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert len(train) == 2000 and len(test) == 200 and not train & test
    for r in rows:
        a, b = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert int(r["chosen"]) == a + b
        assert int(r["rejected"]) != a + b and abs(int(r["rejected"]) - (a + b)) in (1, 2, 10)
    pairs = load_pairs(out, "test")
    assert len(pairs) == 200 and all(p.chosen_ids[-1] == 2 and p.rejected_ids[-1] == 2 for p in pairs)


def test_deterministic_by_seed(demo, tmp_path):
    out, r, _ = demo
    again = make_demo(tmp_path / "a", seed=0)
    for name in ("corpus.jsonl", "prefs.jsonl"):
        assert (tmp_path / "a" / "raw" / name).read_bytes() == (out / "raw" / name).read_bytes()
    for kind in ("pretrain", "preference"):
        assert [f["sha256"] for f in again[kind]["files"]] == [f["sha256"] for f in r[kind]["files"]]
    assert make_pairs(50, 5, seed=1) != make_pairs(50, 5, seed=0)
    # re-running in place is a no-op
    assert make_demo(tmp_path / "a", seed=0)["up_to_date"]


def test_cli_demo(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path), "--docs", "300", "--pairs", "100",
                 "--test-pairs", "20", "--seed", "3", "--format", "json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["status"] == "built" and s["preference"]["splits"]["test"]["pairs"] == 20
    assert s["pretrain"]["unigram_entropy_nats"] > 2
    assert main(["data", "demo", "--out", str(tmp_path), "--pairs", "9999", "--test-pairs", "2"]) == 2
