"""Synthetic demo data: determinism, sizes, right/wrong answers, chat-formatted corpus, disjoint splits, speed."""

from __future__ import annotations

import collections
import json
import re
import time

import numpy as np
import pytest

from elmctl.cli.main import main
from elmctl.data.chat import format_prompt
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
    assert 300_000 <= corpus_bytes <= 800_000  # 8000 documents of ~45 bytes (+ JSON)
    pre = r["pretrain"]
    assert pre["kind"] == "pretrain" and pre["tokenizer"] == "byte" and pre["recipe"] == "tiny"
    # every short question/answer document passes the tiny recipe's length filters
    assert pre["splits"]["train"]["documents"] + pre["splits"]["val"]["documents"] == 8000
    assert not any(pre["dropped"].values())
    # more than the tiny recipe's default pre-training reads (100 steps x 8 x 256 tokens)
    assert pre["splits"]["train"]["tokens"] > 300_000 and pre["splits"]["val"]["tokens"] > 3_000
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


def test_corpus_is_chat_formatted_and_right(demo):
    out, _, _ = demo
    docs = [json.loads(line)["text"] for line in open(out / "raw" / "corpus.jsonl")]
    pattern = re.compile(r"<\|user\|>\nWhat is the (larger|smaller) of (\d+) and (\d+)\?\n<\|assistant\|>\n(\d+)")
    kinds = collections.Counter()
    for d in docs:
        m = pattern.fullmatch(d)
        assert m, d
        kind, a, b, ans = m[1], int(m[2]), int(m[3]), int(m[4])
        assert a != b and ans == (max(a, b) if kind == "larger" else min(a, b))
        kinds[kind] += 1
    assert len(docs) == 8000 and min(kinds.values()) > 3500  # both kinds, about equally
    # the documents read like the DPO prompts: the same template text around the question
    assert format_prompt([{"role": "user", "content": "Q"}], eos_text="\n") == "<|user|>\nQ\n\n<|assistant|>\n"


def test_pairs_are_checkable_and_splits_disjoint(demo):
    out, _, _ = demo
    rows = [json.loads(line) for line in open(out / "raw" / "prefs.jsonl")]
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert len(train) == 2000 and len(test) == 200 and not train & test
    assert [r["split"] for r in rows] == ["train"] * 2000 + ["test"] * 200
    for r in rows:
        m = re.fullmatch(r"What is the (larger|smaller) of (\d+) and (\d+)\?", r["prompt"])
        kind, a, b = m[1], int(m[2]), int(m[3])
        assert r["kind"] == kind and a != b
        right = max(a, b) if kind == "larger" else min(a, b)
        assert int(r["chosen"]) == right
        assert int(r["rejected"]) != right and int(r["rejected"]) in (a, b)  # the plausible mistake
    for split in ("train", "test"):  # both kinds in both splits, so "pick the larger" is chance
        counts = collections.Counter(r["kind"] for r in rows if r["split"] == split)
        assert set(counts) == {"larger", "smaller"} and abs(counts["larger"] - counts["smaller"]) <= 1
    pairs = load_pairs(out, "test")
    assert len(pairs) == 200 and all(p.chosen_ids[-1] == 2 and p.rejected_ids[-1] == 2 for p in pairs)
    assert make_pairs(5000, 5000)[-1]["split"] == "test"  # the CLI's limit (10000) fits
    with pytest.raises(ValueError):
        make_pairs(19_800, 1)


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
