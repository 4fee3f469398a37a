"""Issue #10 class 7 (data inputs): bad text and bad `--out` give one `file:line` message and exit 2."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

DOCS = [f"document {i}: " + "the quick brown fox jumps. " * (1 + i % 5) for i in range(30)]
PAIRS = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)]


def lines(rows: list[dict]) -> list[str]:
    return [json.dumps(r) for r in rows]


def prepare(cli, kind: str, src: Path, out: Path, *extra: str):
    args = ["data", "prepare", str(src), "-t", "byte", "--out", str(out), "--kind", kind, *extra]
    if kind == "pretrain":
        args += ["--min-chars", "0", "--min-tokens", "0"]
    return cli(*args)


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_clean_failure(r, out: Path, where: str, *words: str):
    assert r.code == 2, r.out + r.err
    assert "Traceback" not in r.err and r.err.startswith("error:"), r.err
    msg = flat(r.err)
    assert where in msg, msg
    for w in words:
        assert w in msg, msg
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.tmp"))


# JSON may spell a lone UTF-16 surrogate as an escape; it decodes to a Python str that cannot be
# encoded as UTF-8, so the tokenizer would crash on it far from the file and line that holds it.
SURROGATES = ['"\\ud800"', '"text \\udfff end"', '"\\ud83d no low half"']


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("escaped", SURROGATES)
def test_pretrain_lone_surrogate_names_file_and_line(cli, tmp_path, escaped, workers):
    src = tmp_path / "corpus.jsonl"
    rows = lines([{"text": d} for d in DOCS])
    rows.insert(7, '{"text": ' + escaped + ', "id": 7}')
    src.write_text("\n".join(rows) + "\n")
    r = prepare(cli, "pretrain", src, tmp_path / "out", "--workers", workers)
    assert_clean_failure(r, tmp_path / "out", f"{src}:8", "Unicode")


def test_pretrain_gzip_lone_surrogate_names_file_and_line(cli, tmp_path):
    src = tmp_path / "corpus.jsonl.gz"
    rows = lines([{"text": d} for d in DOCS])
    rows.insert(3, '{"text": "ok \\udc80"}')
    with gzip.open(src, "wt") as f:
        f.write("\n".join(rows) + "\n")
    r = prepare(cli, "pretrain", src, tmp_path / "out", "--workers", "1")
    assert_clean_failure(r, tmp_path / "out", f"{src}:4", "Unicode")


@pytest.mark.parametrize("kind", ["preference", "sft"])
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "messages"])
def test_pairs_lone_surrogate_names_file_and_line(cli, tmp_path, kind, field):
    src = tmp_path / "prefs.jsonl"
    rows = lines(PAIRS)
    bad = {"prompt": "q", "chosen": "a", "rejected": "b"}
    if field == "messages":
        bad["chosen"] = [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]
        bad["rejected"] = [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "no"}]
        del bad["prompt"]
        text = json.dumps(bad).replace("\\\\ud800", "\\ud800")
    else:
        text = json.dumps({**bad, field: "x @@ y"}).replace("@@", "\\udbff")
    rows.insert(4, text)
    src.write_text("\n".join(rows) + "\n")
    r = prepare(cli, kind, src, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", f"{src}:5", "Unicode")


@pytest.mark.parametrize("kind", ["pretrain", "preference"])
def test_out_that_is_an_existing_file(cli, tmp_path, kind):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines([{"text": d} for d in DOCS] if kind == "pretrain" else PAIRS)) + "\n")
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    r = prepare(cli, kind, src, target)
    assert r.code == 2, r.out + r.err
    assert "Traceback" not in r.err and "--out" in r.err and "not a folder" in flat(r.err)
    assert target.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("value", ["validation", "dev", "eval", 3, True, ["train"]])
def test_pairs_with_an_unknown_split_value(cli, tmp_path, value):
    """A `split` that is neither train nor test used to land silently in train."""
    src = tmp_path / "prefs.jsonl"
    known = ["train", "test", "train_prefs", "test_prefs", "TRAIN", "Test_Gen", None]  # null: "not given"
    rows = [{**p, "split": known[i % len(known)]} for i, p in enumerate(PAIRS)]
    rows[11]["split"] = value
    src.write_text("\n".join(lines(rows)) + "\n")
    r = prepare(cli, "preference", src, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", f"{src}:12", "split", json.dumps(value))
    del rows[11]
    src.write_text("\n".join(lines(rows)) + "\n")
    r = prepare(cli, "preference", src, tmp_path / "out", "--format", "json", "--test-fraction", "0")
    assert r.code == 0, r.err
    got = json.loads(r.out)["splits"]
    want_test = sum(1 for row in rows if row["split"] in ("test", "test_prefs", "Test_Gen"))
    assert (got["test"]["pairs"], got["train"]["pairs"]) == (want_test, len(rows) - want_test)
