"""`data prepare` (pretrain): formats, filters, manifest, splits, idempotence, interruption, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from elmctl.cli.main import main
from elmctl.data import resolve_data_dir
from elmctl.data.prepare import doc_fraction, prepare_pretrain
from elmctl.data.shards import TokenDataset
from elmctl.errors import UsageError

DOCS = [f"document {i}: " + "the quick brown fox jumps. " * (1 + i % 5) for i in range(60)]
LOOSE = {"min_chars": 0, "min_tokens": 0, "val_fraction": 0.0}


def stream(docs):
    """The expected token stream: [BOS] bytes+3 [EOS] per document (byte tokenizer)."""
    return np.concatenate([[1, *(b + 3 for b in d.encode()), 2] for d in docs]).astype(np.int64)


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def read_all(folder, split="train"):
    ds = TokenDataset(folder, split)
    return ds.read(0, ds.num_tokens)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "txt-lines", "txt-files"])
def test_input_formats_give_the_same_stream(tmp_path, fmt):
    if fmt == "jsonl":
        inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS)]
    elif fmt == "jsonl.gz":
        with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
        inputs = [tmp_path / "a.jsonl.gz"]
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "a.parquet")
        inputs = [tmp_path / "a.parquet"]
    elif fmt == "txt-lines":
        (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n")  # blank lines are skipped
        inputs = [tmp_path / "a.txt"]
    else:
        inputs = []
        for i, d in enumerate(DOCS):
            (tmp_path / f"{i:03d}.txt").write_text(d)
            inputs.append(tmp_path / f"{i:03d}.txt")
    split = "lines" if fmt == "txt-lines" else "file"
    r = prepare_pretrain(inputs, tmp_path / "out", "byte", txt_split=split, batch_bytes=500, **LOOSE)
    assert r.manifest["splits"]["train"]["documents"] == len(DOCS)
    np.testing.assert_array_equal(read_all(tmp_path / "out"), stream(DOCS))


def test_text_key(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS, key="content")
    prepare_pretrain([src], tmp_path / "out", "byte", text_key="content", **LOOSE)
    np.testing.assert_array_equal(read_all(tmp_path / "out"), stream(DOCS))


def test_filters_and_recipe_defaults(tmp_path):
    short_chars = "abc"
    short_tokens = "é" * 12  # 12 characters but 24 byte tokens
    ok = "é" * 20  # 40 tokens
    src = write_jsonl(tmp_path / "f.jsonl", [short_chars, short_tokens, ok, ""])
    r = prepare_pretrain([src], tmp_path / "o1", "byte", min_chars=10, min_tokens=30, val_fraction=0)
    assert r.manifest["dropped"] == {"too_few_chars": 2, "too_few_tokens": 1}
    np.testing.assert_array_equal(read_all(tmp_path / "o1"), stream([ok]))
    # recipe tiny: min_chars 20, min_tokens 16; without a recipe the paper's 200 / 256
    docs = ["x" * 25, "y" * 300]
    src2 = write_jsonl(tmp_path / "g.jsonl", docs)
    r = prepare_pretrain([src2], tmp_path / "o2", "byte", recipe="tiny", val_fraction=0)
    assert r.manifest["options"]["min_chars"] == 20 and r.manifest["options"]["min_tokens"] == 16
    assert r.manifest["splits"]["train"]["documents"] == 2
    r = prepare_pretrain([src2], tmp_path / "o3", "byte", val_fraction=0)
    assert (r.manifest["options"]["min_chars"], r.manifest["options"]["min_tokens"]) == (200, 256)
    assert r.manifest["splits"]["train"]["documents"] == 1 and r.manifest["dropped"]["too_few_chars"] == 1


def test_manifest_shards_and_val_split(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    r = prepare_pretrain([src], tmp_path / "out", "byte", min_chars=0, min_tokens=0, val_fraction=0.2,
                         shard_tokens=1000, workers=1)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m == r.manifest
    assert m["kind"] == "pretrain" and m["tokenizer"] == "byte" and m["vocab_size"] == 259
    assert m["dtype"] == "uint16" and (m["bos_id"], m["eos_id"]) == (1, 2)
    val_docs = [d for d in DOCS if doc_fraction(d) < 0.2]
    train_docs = [d for d in DOCS if doc_fraction(d) >= 0.2]
    assert 0 < len(val_docs) < len(DOCS)
    assert m["splits"]["val"]["documents"] == len(val_docs)
    np.testing.assert_array_equal(read_all(tmp_path / "out", "val"), stream(val_docs))
    np.testing.assert_array_equal(read_all(tmp_path / "out"), stream(train_docs))
    train_files = [f for f in m["files"] if f["split"] == "train"]
    assert len(train_files) == m["splits"]["train"]["shards"] > 1
    assert all(f["tokens"] == 1000 for f in train_files[:-1])
    assert sum(f["tokens"] for f in train_files) == m["splits"]["train"]["tokens"]
    for f in m["files"]:
        data = (tmp_path / "out" / f["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"] == 2 * f["tokens"]
    assert m["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["inputs"][0]["size"] == src.stat().st_size
    counts = np.bincount(stream(train_docs), minlength=259)
    p = counts[counts > 0] / counts.sum()
    assert m["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())


def test_workers_do_not_change_output(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS * 5)
    kw = dict(min_chars=0, min_tokens=0, val_fraction=0.1, batch_bytes=300)
    a = prepare_pretrain([src], tmp_path / "w1", "byte", workers=1, **kw).manifest
    b = prepare_pretrain([src], tmp_path / "w2", "byte", workers=2, **kw).manifest
    assert [f["sha256"] for f in a["files"]] == [f["sha256"] for f in b["files"]]




def test_token_dataset_read(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    prepare_pretrain([src], tmp_path / "pretrain", "byte", shard_tokens=97, **LOOSE)
    full = stream(DOCS)
    ds = TokenDataset(tmp_path, "train")  # parent with a pretrain/ subfolder
    assert ds.num_tokens == len(full) and ds.vocab_size == 259 and ds.manifest["tokenizer"] == "byte"
    np.testing.assert_array_equal(ds.read(90, 20), full[90:110])  # crosses a shard boundary
    wrapped = ds.read(len(full) - 5, 12)
    np.testing.assert_array_equal(wrapped, np.concatenate([full[-5:], full[:7]]))
    np.testing.assert_array_equal(ds.read(len(full) + 3, 4), full[3:7])
    assert wrapped.dtype == np.int64
    with pytest.raises(UsageError, match="val split is empty"):
        TokenDataset(tmp_path, "val")


def test_resolve_data_dir(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    prepare_pretrain([src], tmp_path / "d" / "pretrain", "byte", **LOOSE)
    assert resolve_data_dir(tmp_path / "d", "pretrain") == tmp_path / "d" / "pretrain"
    assert resolve_data_dir(tmp_path / "d" / "pretrain", "pretrain") == tmp_path / "d" / "pretrain"
    with pytest.raises(UsageError, match="no prepared preference data"):
        resolve_data_dir(tmp_path / "d", "preference")
    with pytest.raises(UsageError, match="not found"):
        resolve_data_dir(tmp_path / "missing", "pretrain")


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    args = ["data", "prepare", str(src), "--tokenizer", "byte", "--out", str(out), "--min-chars", "0",
            "--min-tokens", "0", "--val-fraction", "0.1"]
    assert main(args) == 0
    shard = out / "train-00000.bin"
    before = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out and shard.stat().st_mtime_ns == before
    os.utime(src, ns=(1, 1))  # touched, same content: still up to date
    assert main(args + ["--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "up_to_date"
    write_jsonl(src, DOCS[:-1])  # changed content: rebuilt
    assert main(args + ["--format", "json"]) == 0
    out_json = json.loads(capsys.readouterr().out)
    assert out_json["status"] == "built"
    assert out_json["splits"]["train"]["documents"] + out_json["splits"]["val"]["documents"] == len(DOCS) - 1
    assert main(args + ["--min-chars", "40", "--format", "json"]) == 0  # changed option: rebuilt
    assert json.loads(capsys.readouterr().out)["status"] == "built"
    shard.unlink()  # a deleted shard is noticed
    assert main(args + ["--min-chars", "40", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "built" and shard.exists()


def killed_midway(*args, after_tokens: int, **kwargs) -> None:
    """prepare_pretrain in a forked child that dies once it wrote ``after_tokens`` (os._exit: like kill -9)."""
    import multiprocessing as mp

    def die(done, total, tokens):
        if tokens >= after_tokens:
            os._exit(9)

    child = mp.get_context("fork").Process(target=prepare_pretrain, args=args, kwargs={**kwargs, "progress": die})
    child.start()
    child.join(60)
    assert child.exitcode == 9


def test_interrupted_run_is_rebuilt(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    good = prepare_pretrain([src], out, "byte", shard_tokens=500, **LOOSE).manifest
    # a rebuild killed mid-way: no manifest, complete shards, a half-written .tmp shard; plus a truncated shard
    killed_midway([src], out, "byte", shard_tokens=500, force=True, batch_bytes=256, after_tokens=1200, **LOOSE)
    assert list(out.glob("train-*.bin.tmp")) and not (out / "manifest.json").exists()
    (out / "train-00001.bin").write_bytes(b"\0" * 4)
    with pytest.raises(UsageError, match="no complete manifest"):
        TokenDataset(out)
    r = prepare_pretrain([src], out, "byte", shard_tokens=500, **LOOSE)
    assert not r.up_to_date
    assert [f["sha256"] for f in r.manifest["files"]] == [f["sha256"] for f in good["files"]]
    assert not list(out.glob("*.tmp"))
    np.testing.assert_array_equal(read_all(out), stream(DOCS))


def train_hf_bpe(path, vocab_size):
    """A byte-level HF BPE tokenizer.json trained on DOCS, specials <unk> <s> </s> = 0 1 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return path


def _fails(capsys, tmp_path, src, *extra):
    out = tmp_path / "out"
    code = main(["data", "prepare", str(src), "-t", "byte", "--out", str(out), "--min-chars", "0",
                 "--min-tokens", "0", "--workers", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.tmp"))
    return " ".join(err.split())


def test_bad_json_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:30]]
    lines.insert(20, "")  # a blank line must not shift the reported line number
    lines.insert(25, '{"text": "unterminated')
    src.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, tmp_path, src, "--val-fraction", "0")
    assert "bad.jsonl:26" in err and "bad JSON" in err


def test_missing_key(tmp_path, capsys):
    src = tmp_path / "k.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    err = _fails(capsys, tmp_path, src)
    assert "k.jsonl:2" in err and "no 'text' key" in err and "body" in err and "--text-key" in err


def test_bad_gzip(tmp_path, capsys):
    src = tmp_path / "c.jsonl.gz"
    data = gzip.compress(("\n".join(json.dumps({"text": d}) for d in DOCS * 20)).encode())
    src.write_bytes(data[: len(data) // 2])  # truncated
    err = _fails(capsys, tmp_path, src)
    assert "c.jsonl.gz" in err and "corrupt gzip" in err
    src.write_bytes(b"this is not gzip at all")
    assert "c.jsonl.gz" in _fails(capsys, tmp_path, src)


def test_empty_inputs(tmp_path, capsys):
    src = tmp_path / "e.jsonl"
    src.write_text("\n\n")
    err = _fails(capsys, tmp_path, src)
    assert "e.jsonl" in err and "empty" in err
    txt = tmp_path / "e.txt"
    txt.write_text("   \n")
    assert "e.txt: input is empty" in _fails(capsys, tmp_path, txt)
    short = write_jsonl(tmp_path / "s.jsonl", ["tiny"])
    err = _fails(capsys, tmp_path, short, "--min-chars", "100")
    assert "no training documents left" in err and "1 under 100 characters" in err


def test_parquet_missing_column_and_unknown_type(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    err = _fails(capsys, tmp_path, tmp_path / "p.parquet")
    assert "p.parquet" in err and "no column 'text'" in err and "body" in err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "unsupported input type" in _fails(capsys, tmp_path, tmp_path / "x.csv")


def test_vocab_mismatch_via_cli(tmp_path, capsys):
    tok = train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=300)
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    code = main(["data", "prepare", str(src), "-t", str(tok), "--out", str(tmp_path / "o"), "--recipe", "tiny"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "300 tokens" in err and "vocabulary of 259" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_hf_tokenizer_prepare_with_two_workers(tmp_path):
    from elmctl.data.tokenizers import load_tokenizer
    tok_path = train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=300)
    tok = load_tokenizer(tok_path)
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    prepare_pretrain([src], tmp_path / "out", str(tok_path), workers=2, batch_bytes=400, **LOOSE)
    expected = np.concatenate([tok.encode(d, add_bos=True, add_eos=True) for d in DOCS])
    np.testing.assert_array_equal(read_all(tmp_path / "out"), expected)
