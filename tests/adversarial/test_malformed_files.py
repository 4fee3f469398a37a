"""Issue #10 class 6 (untrusted and malformed files, the reading side): an HF folder's config.json,
weights and index file, and a data folder's manifest.json, when wrong in any way, give one clear
refusal (exit 2 on the CLI, UsageError in the API), never a traceback, never a file outside the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adv_util import demo_data, tiny_hf
from elmctl.errors import UsageError

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def good_config(hf) -> dict:
    return json.loads((hf / "config.json").read_text())


def _folder(hf: Path, dest: Path, config: str | bytes | None = None) -> Path:
    shutil.copytree(hf, dest)
    if config is not None:
        (dest / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    return dest


def _generate(cli, folder: Path):
    return cli("generate", str(folder), "-p", "hi", "-n", "1")


def _refused(r, *words: str) -> str:
    assert r.code == 2, (r.code, r.err[-3000:])
    assert "Traceback" not in r.err and r.err.startswith("error:"), r.err[-3000:]
    assert "weights_only" not in r.err
    msg = " ".join(r.err.split())
    for w in words:
        assert w in msg, msg
    return msg


def _edit(good: dict, **change) -> str:
    return json.dumps({**good, **change})


# --------------------------------------------------------------------------------------------
# config.json

CONFIG_CASES = {
    # name: (config text from the good one, words the message must hold)
    "array": (lambda g: "[1, 2]", ["must be a JSON object", "not an array"]),
    "string": (lambda g: '"openelm"', ["must be a JSON object", "not a string"]),
    "syntax": (lambda g: '{"model_type": "openelm",', ["not valid JSON", "line 1"]),
    "nan": (lambda g: _edit(g, rms_norm_eps=float("nan")), ["NaN is not a number JSON allows"]),
    "infinity": (lambda g: _edit(g).replace('"num_transformer_layers": 4', '"num_transformer_layers": Infinity'),
                 ["Infinity is not a number JSON allows"]),
    "overflowing_float": (lambda g: _edit(g).replace('"num_transformer_layers": 4', '"num_transformer_layers": 1e400'),
                          ["1e400 is out of range"]),
    "5000_digits": (lambda g: _edit(g).replace('"num_transformer_layers": 4', '"num_transformer_layers": ' + "9" * 5000),
                    ["5000 digits", "out of range"]),
    "deep": (lambda g: '{"model_type": "openelm", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
             ["nested too deeply"]),
    "moderately_deep": (lambda g: _edit(g, x=json.loads("[" * 200 + "]" * 200)), ["nested too deeply", "64 levels"]),
    "layers_bool": (lambda g: _edit(g, num_transformer_layers=True), ["num_transformer_layers must be an integer, got True"]),
    "layers_string": (lambda g: _edit(g, num_transformer_layers="4"), ["num_transformer_layers must be an integer, got '4'"]),
    "layers_float": (lambda g: _edit(g, num_transformer_layers=4.5), ["num_transformer_layers must be an integer, got 4.5"]),
    "vocab_huge": (lambda g: _edit(g, vocab_size=10**30), ["vocab_size", "out of range"]),
    "query_heads_strings": (lambda g: _edit(g, num_query_heads=["a", "b", "c", "d"]),
                            ["num_query_heads must be a list of 4 numbers"]),
    "query_heads_object": (lambda g: _edit(g, num_query_heads={"a": 1}), ["num_query_heads must be a list of 4 numbers"]),
    "ffn_strings": (lambda g: _edit(g, ffn_multipliers=["a", "b"]), ["ffn_multipliers must be a number, [min, max]"]),
    "ffn_bools": (lambda g: _edit(g, ffn_multipliers=[True, True]), ["ffn_multipliers must be a number, [min, max]"]),
    "lone_surrogate": (lambda g: _edit(g).replace('"model_type": "openelm"', '"model_type": "\\ud800"'),
                       ["unpaired surrogate"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_json_is_one_clear_refusal(cli, hf, good_config, tmp_path, case):
    make, words = CONFIG_CASES[case]
    folder = _folder(hf, tmp_path / case, make(good_config))
    _refused(_generate(cli, folder), *words)


def test_config_json_not_utf8(cli, hf, tmp_path):
    folder = _folder(hf, tmp_path / "latin1", b'{"model_type": "openelm", "note": "caf\xe9"}')
    _refused(_generate(cli, folder), "config.json", "not UTF-8", "byte 0xe9")


def test_load_pretrained_and_tune_base_refuse_the_same_way(hf, tmp_path):
    """The API (load_pretrained) and `tune --base HF_DIR` (check_base) read config.json through one reader."""
    from elmctl.config import load_recipe
    from elmctl.model.hf import load_pretrained, model_config_from_hf
    from elmctl.train.tune.inputs import Base, check_base

    folder = _folder(hf, tmp_path / "arr", "[1]")
    with pytest.raises(UsageError, match="must be a JSON object"):
        load_pretrained(folder)
    with pytest.raises(UsageError, match="must be a JSON object"):
        check_base(Base("hf", str(folder), str(folder)), load_recipe("tiny"))
    with pytest.raises(UsageError, match="must be a JSON object"):
        model_config_from_hf([1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# weights and index files


def test_pickle_named_model_safetensors_is_refused_without_torch_advice(cli, hf, tmp_path):
    folder = _folder(hf, tmp_path / "pickle")
    torch.save({"transformer.norm.weight": torch.zeros(4)}, folder / "model.safetensors")
    _refused(_generate(cli, folder), "model.safetensors", "not a safetensors file")


def _sharded(hf: Path, dest: Path, index) -> Path:
    folder = _folder(hf, dest)
    (folder / "model.safetensors").rename(folder / SHARD)
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


def _weight_map(hf: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        return {k: SHARD for k in f.keys()}


INDEX_CASES = {
    "array": ("[1]", ["safetensors index must be a JSON object"]),
    "number_entry": ({"weight_map": {"transformer.norm.weight": 1}}, ["must be a file name, got 1"]),
    "null_entry": ({"weight_map": {"transformer.norm.weight": None}}, ["must be a file name, got None"]),
    "object_entry": ({"weight_map": {"transformer.norm.weight": {"f": SHARD}}}, ["must be a file name"]),
    "nul_in_name": ({"weight_map": {"transformer.norm.weight": "model\u0000.safetensors"}}, ["which is not a file in"]),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index_is_one_clear_refusal(cli, hf, tmp_path, case):
    index, words = INDEX_CASES[case]
    folder = _sharded(hf, tmp_path / case, index)
    _refused(_generate(cli, folder), *words)


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_index_cannot_point_outside_the_folder(cli, hf, tmp_path, where):
    """Before: the index was followed to any path, so a folder could load (or probe) files elsewhere."""
    ok = _sharded(hf, tmp_path / "ok", {"metadata": {}, "weight_map": _weight_map(hf)})
    assert _generate(cli, ok).code == 0  # a good sharded folder still loads
    outside = _folder(hf, tmp_path / "elsewhere")  # real weights, outside the folder
    target = {"parent": "../elsewhere/model.safetensors", "absolute": str(outside / "model.safetensors"),
              "subfolder": "sub/model.safetensors"}[where]
    folder = _sharded(hf, tmp_path / "victim", {"weight_map": {k: target for k in _weight_map(hf)}})
    (folder / "sub").mkdir()
    shutil.copy(outside / "model.safetensors", folder / "sub" / "model.safetensors")
    msg = _refused(_generate(cli, folder), "which is not a file in", "refusing to read files elsewhere")
    assert target[:40] in msg


# --------------------------------------------------------------------------------------------
# data manifests


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_data(tmp_path_factory.mktemp("demo") / "data")


def _manifest_copy(demo: Path, dest: Path, kind: str = "pretrain", **change) -> Path:
    shutil.copytree(demo / kind, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m.update(change)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


MANIFEST_CASES = {
    "array": (lambda m: "[]", ["a data manifest must be a JSON object"]),
    "empty": (lambda m: "{}", ["no 'kind' field"]),
    "splits_list": (lambda m: json.dumps({**m, "splits": []}), ["'splits' must be"]),
    "splits_text": (lambda m: json.dumps({**m, "splits": {"train": {"tokens": "many"}}}), ["'splits' must be"]),
    "vocab_string": (lambda m: json.dumps({**m, "vocab_size": "x"}), ["'vocab_size' must be a positive integer"]),
    "tokenizer_number": (lambda m: json.dumps({**m, "tokenizer": 5}), ["'tokenizer' must be a string"]),
    "dtype_object": (lambda m: json.dumps({**m, "dtype": "object"}), ["'dtype' must be uint16 or uint32"]),
    "files_dict": (lambda m: json.dumps({**m, "files": {}}), ["'files' must be a list"]),
    "deep": (lambda m: '{"kind": ' + "[" * 50_000 + "]" * 50_000 + "}", ["nested too deeply"]),
    "nan": (lambda m: json.dumps({**m, "seconds": float("nan")}), ["NaN is not a number JSON allows"]),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_is_one_clear_refusal(cli, demo, tmp_path, case):
    folder = _manifest_copy(demo, tmp_path / case)
    if case == "array":  # the demo's own manifests read
        r = cli("data", "info", str(demo))
        assert r.code == 0 and "pretrain" in r.out and "preference" in r.out, r.err
    good = json.loads((folder / "manifest.json").read_text())
    make, words = MANIFEST_CASES[case]
    (folder / "manifest.json").write_text(make(good))
    _refused(cli("data", "info", str(folder)), "manifest.json", *words)
    # the training side says the same instead of "no prepared data"
    _refused(cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(folder)), "manifest.json", *words)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/train-00000.bin", ".."])
def test_manifest_file_names_stay_in_the_folder(demo, tmp_path, name):
    """Before: TokenDataset memory-mapped whatever path a manifest named (given a matching size)."""
    from elmctl.data.shards import TokenDataset

    folder = _manifest_copy(demo, tmp_path / "data")
    m = json.loads((folder / "manifest.json").read_text())
    shard = folder / m["files"][0]["name"]
    outside = (folder / name) if not name.startswith("/") else None
    if outside is not None and name != "..":
        outside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shard, outside)
    m["files"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="'files' must be a list of {name: a file name in the folder"):
        TokenDataset(folder)


def test_manifest_token_count_must_fill_the_shard(demo, tmp_path):
    """Before: tokens larger than the shard's bytes reached np.memmap (ValueError traceback)."""
    from elmctl.data.shards import TokenDataset

    folder = _manifest_copy(demo, tmp_path / "data")
    assert len(TokenDataset(folder)) > 0  # the demo's own manifest reads
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][0]["tokens"] *= 2
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="tokens do not fill its"):
        TokenDataset(folder)


# --------------------------------------------------------------------------------------------
# JSONL inputs


@pytest.mark.parametrize("line, words", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", ["bad JSON (nested too deeply)"]),
    ('{"text": "hello there", "n": ' + "9" * 5000 + "}", ["bad JSON", "5000 digits"]),
])
def test_jsonl_line_that_breaks_the_json_parser(cli, tmp_path, line, words):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a fine first document"}\n' + line + "\n")
    r = cli("data", "prepare", str(src), "-t", "byte", "--out", str(tmp_path / "out"), "--min-chars", "0",
            "--min-tokens", "0", "-j", "1")
    msg = _refused(r, f"{src}:2", *words)
    assert "sys.set_int_max_str_digits" not in msg
