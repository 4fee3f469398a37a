"""Property-based: any mangled recipe ends in a clear error (exit 2, no traceback), never a crash."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elmctl.cli.main import main
from elmctl.config import load_recipe
from elmctl.config.loader import RecipeError
from elmctl.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(TINY))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8
)


@st.composite
def mangled(draw):
    data = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node = data
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        action = draw(st.sampled_from(["delete", "rename", "swap_type", "random", "numeric"]))
        key = path[-1]
        if action == "delete":
            del node[key]
        elif action == "rename":
            node[draw(st.text(min_size=1, max_size=12))] = node.pop(key)
        elif action == "swap_type":
            old = node[key]
            node[key] = draw(st.sampled_from([str(old), [old], {"x": old}, None, True, 1.5, "abc"]))
        elif action == "random":
            node[key] = draw(values)
        else:
            node[key] = draw(st.one_of(st.integers(-(10**6), 10**9), st.floats(-1e6, 1e12)))
    return data


def _check_cli(path: Path, capsys) -> None:
    capsys.readouterr()
    rc = main(["recipe", "validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc != 0:
        assert rc == 2 and "error:" in err and "problem" in err
    # a recipe that validates must also show (derived numbers must not overflow)
    if rc == 0:
        assert main(["recipe", "show", str(path), "--format", "json"]) == 0
        capsys.readouterr()


@SETTINGS
@given(data=mangled())
def test_mangled_recipe_clear_error(tmp_path_factory, capsys, data):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    try:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except (RecipeError, UsageError) as exc:
        assert exc.exit_code == 2 and str(exc)
        for p in getattr(exc, "problems", []):
            assert p.message
    _check_cli(path, capsys)


yaml_text = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(
            ["id: x", "model:", "  num_layers: 4", "  - 1", "pretrain: {a: 1", "&a [*a]", ": :", "? [1]", "'x", "\t", "!!binary AAA",
             "!!python/object:os.system {}", "a: !!float abc", "b: 1e-3", "c: .nan", "%YAML 1.1", "---", "...", "k: |", "  \u00e9"]
        ),
        max_size=12,
    ).map("\n".join),
)


@SETTINGS
@given(text=yaml_text)
def test_random_yaml_text_clear_error(tmp_path_factory, capsys, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates -> undecodable bytes
    with pytest.raises((RecipeError, UsageError)) as info:
        load_recipe(path)
    assert info.value.exit_code == 2
    _check_cli(path, capsys)


@SETTINGS
@given(key=st.sampled_from([".".join(p) for p in PATHS] + ["x", "model.x", "a.b.c", ".", "model..x"]), value=st.text(max_size=30))
def test_random_overrides_clear_error(key, value):
    try:
        r = load_recipe("tiny", [f"{key}={value}"])
    except (RecipeError, UsageError) as exc:
        assert exc.exit_code == 2 and str(exc)
    else:
        assert r.id  # accepted overrides give a valid recipe
        for f in ("max_lr", "min_lr"):
            assert math.isfinite(getattr(r.pretrain, f))
