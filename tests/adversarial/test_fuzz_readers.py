"""Issue #10 (classes 4 and 6), property-based: random config.json, safetensors index and data
manifest contents, fed through the CLI commands that read them (`generate HF_DIR`, `data info`)
and the readers behind them. Zero tracebacks; anything refused is exit 2 with one "error:" message.

Each example rewrites one file of a folder built once per module, so the whole file runs in well
under a minute (max_examples is modest on purpose; ELMCTL_FUZZ_EXAMPLES raises it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adv_util import demo_data, tiny_hf
from elmctl.cli.main import main
from elmctl.errors import UsageError

# ELMCTL_FUZZ_EXAMPLES=1000 for a deeper search than the default run's
SETTINGS = settings(max_examples=int(os.environ.get("ELMCTL_FUZZ_EXAMPLES", 30)), deadline=None,
                    suppress_health_check=list(HealthCheck))
SHARD = "model-00001-of-00001.safetensors"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**45), max_value=10**45),  # past 40 digits JSON numbers are refused
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN / Infinity tokens
    st.text(max_size=12),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def mutated(draw, good: dict) -> str:
    """The good object with 1-4 keys deleted, retyped or set to random JSON, or something else entirely."""
    how = draw(st.sampled_from(["fields", "fields", "fields", "other_json", "truncated", "bytes", "deep"]))
    if how == "other_json":
        return _dumps(draw(values))
    if how == "truncated":
        text = _dumps(good)
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "bytes":
        return draw(st.binary(max_size=64)).decode("latin-1")
    if how == "deep":
        depth = draw(st.integers(50, 5000))
        return '{"a": ' + "[" * depth + "]" * depth + "}"
    data = json.loads(_dumps(good))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(data) or ["x"]))
        action = draw(st.sampled_from(["delete", "random", "swap_type", "numeric", "new_key"]))
        if action == "delete":
            data.pop(key, None)
        elif action == "random":
            data[key] = draw(values)
        elif action == "swap_type":
            old = data.get(key)
            data[key] = draw(st.sampled_from([str(old), [old], {"x": old}, None, True, 1.5, "abc", -1]))
        elif action == "numeric":
            data[key] = draw(st.one_of(st.integers(-(10**6), 10**9), st.floats(-1e6, 1e12)))
        else:
            data[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return _dumps(data)


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates reach the file as bytes


def _check_cli(capsys, *args: str) -> int:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert "weights_only" not in err
    assert code in (0, 2), (code, err[-3000:])
    if code == 2:
        assert err.startswith("error:"), err[-3000:]
    event(f"exit {code}: {err.split(':', 2)[-1].strip()[:40] if code else 'ok'}")  # --hypothesis-show-statistics
    return code


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("fuzz") / "hf")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, hf) -> Path:
    from safetensors import safe_open

    folder = tmp_path_factory.mktemp("fuzz") / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf / "config.json").read_bytes())
    (folder / SHARD).write_bytes((hf / "model.safetensors").read_bytes())
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: SHARD for k in names}}))
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_data(tmp_path_factory.mktemp("fuzz") / "demo")


@SETTINGS
@given(data=st.data())
def test_fuzz_config_json_through_generate(hf, capsys, data):
    good = json.loads((hf / "config.json").read_text())
    try:
        _write(hf / "config.json", data.draw(mutated(good)))
        _check_cli(capsys, "generate", hf, "-p", "hi", "-n", "1")
        # the API raises UsageError (the same refusal) or returns a model
        from elmctl.model.hf import load_pretrained

        try:
            load_pretrained(hf)
        except UsageError:
            pass
    finally:
        (hf / "config.json").write_text(json.dumps(good))


@st.composite
def index_documents(draw, names: list[str]) -> str:
    good = {"metadata": {"total_size": 1}, "weight_map": {k: SHARD for k in names}}
    how = draw(st.sampled_from(["entries", "entries", "entries", "object"]))
    if how == "object":
        return draw(mutated(good))
    weight_map = dict(good["weight_map"])
    odd_names = st.one_of(
        values,
        st.sampled_from(["", ".", "..", "../" + SHARD, "/" + SHARD, "sub/" + SHARD, "a\\b", "x\u0000y", SHARD + "/",
                         "model.safetensors.index.json", "config.json", "missing.safetensors"]),
        st.text(max_size=20),
    )
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(names), st.text(max_size=10)))
        weight_map[key] = draw(odd_names)
    return _dumps({**good, "weight_map": weight_map})


@SETTINGS
@given(data=st.data())
def test_fuzz_index_files_through_generate(sharded, capsys, data):
    index = sharded / "model.safetensors.index.json"
    good = index.read_text()
    names = list(json.loads(good)["weight_map"])
    try:
        _write(index, data.draw(index_documents(names)))
        _check_cli(capsys, "generate", sharded, "-p", "hi", "-n", "1")
    finally:
        index.write_text(good)


@SETTINGS
@given(data=st.data())
def test_fuzz_data_manifests_through_data_info_and_readers(demo, capsys, data):
    from elmctl.data.preference import load_pairs
    from elmctl.data.shards import TokenDataset

    kind = data.draw(st.sampled_from(["pretrain", "preference"]))
    path = demo / kind / "manifest.json"
    good = json.loads(path.read_text())
    try:
        _write(path, data.draw(mutated(good)))
        _check_cli(capsys, "data", "info", demo / kind)
        try:
            TokenDataset(demo / kind) if kind == "pretrain" else load_pairs(demo / kind)
        except UsageError:
            pass
    finally:
        path.write_text(json.dumps(good))
