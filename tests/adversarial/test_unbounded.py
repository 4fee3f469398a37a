"""Issue #10 class 4 (unbounded work): every file elmctl reads has a size bound, problem lists are
capped, and no one-line edit of a config.json makes a load allocate gigabytes.

Limits live in ``elmctl._files`` (one table); tests that would need a 64 MiB file lower the limit
with monkeypatch instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adv_util import tiny_hf

REPO = Path(__file__).resolve().parents[2]
TINY_TEXT = (REPO / "recipes" / "tiny.yaml").read_text()
ELMCTL = str(Path(sys.executable).parent / "elmctl")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


def _copy_hf(hf: Path, dest: Path, **config_changes) -> Path:
    dest.mkdir()
    for f in hf.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    if config_changes:
        cfg = json.loads((hf / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    return dest


def _unknown_keys(n: int) -> str:
    return TINY_TEXT + "".join(f"{i:x}x: 0\n" for i in range(n))


def test_million_unknown_keys_is_refused_in_seconds(tmp_path):
    """Before: minutes of parsing, gigabytes, one printed line per key. Now: the size limit, at once."""
    path = tmp_path / "million.yaml"
    path.write_text(_unknown_keys(1_000_000))
    t0 = time.perf_counter()
    r = subprocess.run([ELMCTL, "recipe", "validate", str(path)], capture_output=True, text=True, timeout=60,
                       env=os.environ.copy())
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "too large" in r.stderr and "128 KiB" in r.stderr, r.stderr[:2000]
    assert len(r.stderr.splitlines()) <= 55
    assert seconds < 20, seconds  # typically under 1 s; generous for a loaded machine


def test_many_unknown_keys_print_fifty_problems_and_a_count(cli, tmp_path):
    """A file under the size limit with 12,000 unknown keys: 50 problems, then "and 11950 more"."""
    path = tmp_path / "many.yaml"
    path.write_text(_unknown_keys(12_000))
    assert path.stat().st_size < 128 * 1024
    r = cli("recipe", "validate", str(path))
    assert r.code == 2 and "Traceback" not in r.err
    assert "12000 problems in recipe" in r.err
    assert "... and 11950 more" in r.err
    assert len(r.err.splitlines()) <= 55, len(r.err.splitlines())


def test_recipe_error_message_is_capped_but_keeps_every_problem():
    from elmctl.config.loader import RecipeError, recipe_from_dict

    data = yaml.safe_load(TINY_TEXT)
    data.update({f"k{i}": 1 for i in range(5000)})
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    assert len(info.value.problems) == 5000  # the API keeps them all
    lines = str(info.value).splitlines()
    assert len(lines) <= 53 and "  ... and 4950 more" in lines
    shown = [ln for ln in lines if "unknown key" in ln]
    assert len(shown) == 50


def test_config_json_over_the_limit_is_refused(hf, tmp_path, cli):
    """Before: a 2 MiB config.json (a long padding string) was read whole and the model loaded."""
    d = _copy_hf(hf, tmp_path / "big")
    cfg = json.loads((d / "config.json").read_text())
    cfg["padding"] = "x" * (2 << 20)
    (d / "config.json").write_text(json.dumps(cfg))
    r = cli("generate", str(d), "-p", "hi", "-n", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert "config.json" in r.err and "too large" in r.err and "1 MiB" in r.err, r.err


def test_index_over_the_limit_is_refused(hf, tmp_path):
    from elmctl.errors import UsageError
    from elmctl.model.hf import load_pretrained

    d = _copy_hf(hf, tmp_path / "sharded")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"pad": "x" * (17 << 20)}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(UsageError, match=r"too large .*16 MiB limit for a safetensors index"):
        load_pretrained(d)


def test_padded_vocab_cannot_ask_for_gigabytes(hf, tmp_path, cli):
    """Before: elmctl_padded_vocab_size 16777216 made `generate` pad 16M zero rows (17 GB, a minute)."""
    d = _copy_hf(hf, tmp_path / "pad", elmctl_padded_vocab_size=1 << 24)
    r = cli("generate", str(d), "-p", "hi", "-n", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert "elmctl_padded_vocab_size 16777216" in r.err, r.err


@pytest.mark.parametrize("field", ["rope_max_length", "max_context_length"])
def test_positions_are_bounded(hf, tmp_path, cli, field):
    """Before: rope_max_length 16777216 built 4 GiB RoPE tables for a 2.7 MB model (7.7 GB RSS, 26 s)."""
    d = _copy_hf(hf, tmp_path / "rope", **{field: 1 << 24})
    r = cli("generate", str(d), "-p", "hi", "-n", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert "less than or equal to 1048576" in r.err, r.err


def test_recipe_positions_are_bounded(cli, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_TEXT.replace("rope_max_length: 512", "rope_max_length: 16777216"))
    assert "16777216" in path.read_text()
    r = cli("recipe", "validate", str(path))
    assert r.code == 2 and "model.rope_max_length" in r.err and "1048576" in r.err, r.err


def test_data_manifest_over_the_limit_is_refused(cli, tmp_path, monkeypatch):
    import elmctl.data._manifest as mf

    from adv_util import demo_data

    demo_data(tmp_path / "demo")
    folder = tmp_path / "demo" / "pretrain"
    m = json.loads((folder / "manifest.json").read_text())
    m["notes"] = "x" * 4096
    (folder / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 2048, raising=False)  # 64 MiB in real use
    r = cli("data", "info", str(folder))
    assert r.code == 2 and "Traceback" not in r.err
    assert "manifest.json" in r.err and "too large" in r.err, r.err


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_line_over_the_limit_is_refused(cli, tmp_path, monkeypatch):
    """A JSONL line longer than the limit (64 MiB in real use) names the file and line, unread."""
    import elmctl.data._readers as readers

    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", 4096, raising=False)
    docs = [json.dumps({"text": f"document {i} " * 20}) for i in range(5)]
    src = _jsonl(tmp_path / "in.jsonl", docs[:3] + [json.dumps({"text": "y" * 10_000})] + docs[3:])
    r = cli("data", "prepare", str(src), "-t", "byte", "--out", str(tmp_path / "out"), "--min-chars", "0",
            "--min-tokens", "0", "-j", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert f"{src}:4: line longer than 4 KiB" in " ".join(r.err.split()), r.err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_jsonl_without_newlines_is_not_read_whole(cli, tmp_path, monkeypatch):
    import elmctl.data._readers as readers

    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", 4096, raising=False)
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"text": "z" * 50_000}))  # no newline at all
    r = cli("data", "prepare", str(src), "-t", "byte", "--out", str(tmp_path / "out"), "--min-chars", "0",
            "--min-tokens", "0", "-j", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert f"{src}:1: line longer than 4 KiB" in " ".join(r.err.split()), r.err


def test_txt_document_over_the_limit_suggests_lines(cli, tmp_path, monkeypatch):
    import elmctl.data._readers as readers

    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", 4096, raising=False)
    src = tmp_path / "book.txt"
    src.write_text("a line of a long book\n" * 1000)
    out = tmp_path / "out"
    r = cli("data", "prepare", str(src), "-t", "byte", "--out", str(out), "--min-chars", "0", "--min-tokens", "0",
            "-j", "1")
    assert r.code == 2 and "Traceback" not in r.err
    assert "--txt-split lines" in r.err, r.err
    r = cli("data", "prepare", str(src), "-t", "byte", "--out", str(out), "--min-chars", "0", "--min-tokens", "0",
            "-j", "1", "--txt-split", "lines")
    assert r.code == 0, r.err
