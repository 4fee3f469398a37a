"""Every validation rule has a failing example whose message names the field path and YAML line."""

from __future__ import annotations

from pathlib import Path

import pytest

from elmctl.config import load_recipe
from elmctl.config.loader import RecipeError, parse_overrides, recipe_from_dict, validate_files
from elmctl.errors import UsageError


def line_of(path: Path, dotted: str) -> int:
    """1-based line of a dotted key in a block-style YAML file (independent of the loader)."""
    lines = path.read_text().splitlines()
    start, indent = 0, 0
    for part in dotted.split("."):
        for i in range(start, len(lines)):
            if lines[i].startswith(" " * indent + part + ":"):
                start, indent = i + 1, indent + 2
                break
        else:
            raise AssertionError(f"{dotted} not in {path}")
    return start


def problems_of(path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.exit_code == 2
    return info.value.problems


def set_(dotted: str, value):
    def edit(d):
        *head, last = dotted.split(".")
        for k in head:
            d = d[k]
        d[last] = value

    return edit


def delete(dotted: str):
    def edit(d):
        *head, last = dotted.split(".")
        for k in head:
            d = d[k]
        del d[last]

    return edit


# (edit, field the message must name, fragment of the message)
RULES = [
    (set_("model.model_dim", 100), "model.model_dim", "not divisible by head_dim"),
    (set_("model.head_dim", 3), "model.head_dim", "must be even"),
    (set_("model.padded_vocab_size", 200), "model.padded_vocab_size", "smaller than vocab_size"),
    (set_("model.pad_token_id", 400), "model.pad_token_id", "outside padded_vocab_size"),
    (set_("model.bos_token_id", 300), "model.bos_token_id", "outside vocab_size"),
    (set_("model.eos_token_id", 1), "model.eos_token_id", "distinct"),
    (set_("model.pad_token_id", 2), "model.eos_token_id", "equals pad_token_id"),
    (set_("model.rope_max_length", 128), "model.rope_max_length", "shorter than context_length"),
    (set_("model.qkv_multipliers", [1.0, 0.5]), "model.qkv_multipliers", "0 < min <= max"),
    (set_("model.ffn_multipliers", [0.0, 4.0]), "model.ffn_multipliers", "0 < min <= max"),
    (set_("model.num_layers", 0), "model.num_layers", "greater than or equal to 1"),
    (set_("model.norm_eps", 0.5), "model.norm_eps", "less than 0.01"),
    (set_("model.normalization", "layer_norm"), "model.normalization", "rms_norm"),
    (set_("pretrain.warmup_iterations", 400), "pretrain.warmup_iterations", "below max_iterations"),
    (set_("pretrain.warmup_init_lr", 1e-3), "pretrain.warmup_init_lr", "warmup_init_lr <= min_lr <= max_lr"),
    (set_("pretrain.min_lr", 1e-2), "pretrain.min_lr", "warmup_init_lr <= min_lr <= max_lr"),
    (set_("pretrain.max_lr", 1e-4), "pretrain.min_lr", "min_lr 0.0003 > max_lr 0.0001"),
    (set_("pretrain.adam_betas", [0.9, 1.0]), "pretrain.adam_betas", "(0, 1)"),
    (set_("pretrain.adam_betas", [0.0, 0.95]), "pretrain.adam_betas", "(0, 1)"),
    (set_("pretrain.weight_decay", -0.1), "pretrain.weight_decay", "greater than or equal to 0"),
    (set_("pretrain.seed", -1), "pretrain.seed", "greater than or equal to 0"),
    (set_("pretrain.data_filters.min_tokens", -5), "pretrain.data_filters.min_tokens", "greater than or equal"),
    (set_("instruct.lr_grid", [1e-4, -1e-3]), "instruct.lr_grid", "positive"),
    (set_("instruct.epoch_grid", [1, 2, 2]), "instruct.epoch_grid", "unique"),
    (set_("instruct.lr_grid", [1e-4, 3e-3]), "instruct.lr", "not in lr_grid"),
    (set_("instruct.epochs", 3), "instruct.epochs", "not in epoch_grid"),
    (set_("instruct.max_prompt_length", 128), "instruct.max_prompt_length", "below max_length"),
    (set_("instruct.loss", "ipo"), "instruct.loss", "'sigmoid' or 'hinge'"),
    (set_("instruct.max_length", 1024), "instruct.max_length", "exceeds model.rope_max_length"),
    (set_("provenance.pretrain_nodes", 3), "pretrain.num_gpus", "not a multiple of provenance.pretrain_nodes"),
    # wrong types: no silent coercion of YAML booleans, strings or fractional numbers
    (set_("model.num_layers", "4"), "model.num_layers", "valid integer"),
    (set_("model.num_layers", 4.5), "model.num_layers", "valid integer"),
    (set_("model.num_layers", True), "model.num_layers", "valid integer"),
    (set_("pretrain.max_lr", True), "pretrain.max_lr", "valid number"),
    (set_("model.normalize_qk_projections", "yes"), "model.normalize_qk_projections", "valid boolean"),
    (set_("model", [1, 2]), "model", "valid dictionary"),
    (set_("instruct.lr_grid", "fast"), "instruct.lr_grid", "valid tuple"),
    (set_("pretrain.max_lr", float("inf")), "pretrain.max_lr", "finite"),
    (set_("pretrain.grad_clip", float("nan")), "pretrain.grad_clip", "finite"),
    # missing fields
    (delete("model.head_dim"), "model.head_dim", "required field is missing"),
    (delete("pretrain"), "pretrain", "required field is missing"),
    # unknown keys, with a did-you-mean
    (set_("model.num_layer", 4), "model.num_layer", "did you mean 'num_layers'"),
    (set_("pretrain.max_lrr", 1e-3), "pretrain.max_lrr", "did you mean 'max_lr'"),
    (set_("instrukt", {}), "instrukt", "did you mean 'instruct'"),
]


@pytest.mark.parametrize("edit,field,fragment", RULES, ids=[f"{r[1]}:{r[2][:24]}" for r in RULES])
def test_rule_fails_with_field_and_line(recipe_file, edit, field, fragment):
    path = recipe_file(edit)
    probs = problems_of(path)
    match = [p for p in probs if p.field == field and fragment in p.message]
    assert match, f"no problem for {field!r} containing {fragment!r}: {[str(p) for p in probs]}"
    p = match[0]
    assert p.source == str(path)
    # the line of the field, or of its closest existing parent for missing fields
    key, expected = field, None
    while key and expected is None:
        try:
            expected = line_of(path, key)
        except AssertionError:
            key = key.rpartition(".")[0]
    assert p.line == expected
    if expected is None:  # a missing top-level section has no line
        assert field.count(".") == 0 and f"{path}: {field}:" in str(p)
    else:
        assert f"{path}:{expected}: {field}:" in str(p)


def test_every_layer_has_whole_kv_groups_by_construction():
    from elmctl.config.derived import layer_shapes

    for d in (64, 96, 128, 1000, 1280, 3072):
        for dh in (16, 32, 64):
            for g in (1, 2, 3, 4, 8):
                if d % dh:
                    continue
                for n in (1, 2, 7, 16):
                    m = load_recipe("tiny").model.model_copy(
                        update=dict(model_dim=d, head_dim=dh, num_gqa_groups=g, num_layers=n)
                    )
                    for s in layer_shapes(m):
                        assert s.query_heads % g == 0 and s.kv_heads >= 1


def test_all_problems_reported_at_once(recipe_file):
    def edit(d):
        d["model"]["num_layer"] = 3
        d["pretrain"]["adam_betas"] = [0.9, 1.5]
        d["instruct"]["epochs"] = 7
        del d["provenance"]["pretrain_gpu"]

    probs = problems_of(recipe_file(edit))
    fields = {p.field for p in probs}
    assert {"model.num_layer", "pretrain.adam_betas", "instruct.epochs", "provenance.pretrain_gpu"} <= fields
    assert all(p.line for p in probs)


def test_duplicate_key_reported_with_line(recipe_file, tiny_dict):
    import yaml

    text = yaml.safe_dump(tiny_dict, sort_keys=False).replace("  head_dim: 32\n", "  head_dim: 32\n  head_dim: 64\n")
    path = recipe_file(text=text)
    probs = problems_of(path)
    dup = [p for p in probs if "duplicate key" in p.message]
    assert dup and dup[0].field == "model.head_dim"
    assert dup[0].line == text.splitlines().index("  head_dim: 64") + 1


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("id: tiny\nmodel:\n  num_layers: [4\n  model_dim: 128\n", 4, "not valid YAML"),
        ("id: tiny\nmodel: {a: 1\n", 3, "not valid YAML"),
        ("id: tiny\n  bad_indent: 1\n", 2, "not valid YAML"),
        ("a: &x [1]\nb: *x\n", 2, "aliases"),
        ("a: &a [*a]\n", 1, "aliases"),
        ("id: x\n0: !!float\n", 2, "cannot read"),
        ("id: x\nb: !!int\n", 2, "cannot read"),
        ("", 1, "empty"),
        ("- 1\n- 2\n", 1, "mapping of sections"),
        ("just a string\n", 1, "mapping of sections"),
    ],
)
def test_invalid_yaml_names_the_line(recipe_file, text, line, fragment):
    path = recipe_file(text=text)
    (p,) = problems_of(path)
    assert fragment in p.message and p.line == line
    assert str(p).startswith(f"{path}:{line}:")


def test_deeply_nested_yaml_is_a_clean_error(recipe_file):
    path = recipe_file(text="a: " + "[" * 5000 + "]" * 5000 + "\n")
    (p,) = problems_of(path)
    assert "YAML" in p.message


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    (p,) = problems_of(bad)
    assert "cannot read" in p.message
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_recipe_id_did_you_mean():
    with pytest.raises(UsageError) as info:
        load_recipe("45m")
    assert "unknown recipe '45m'" in info.value.message and "did you mean '450m'" in info.value.hint
    assert info.value.exit_code == 2


def test_yaml_exponent_floats_are_numbers(recipe_file):
    path = recipe_file(text=recipe_file().read_text().replace("max_lr: 0.003", "max_lr: 3e-3"))
    assert load_recipe(path).pretrain.max_lr == 3e-3
    assert parse_overrides(["a=1e-3", "b=-2E5", "c=[1e-5, 2e-5]", "d=abc", "e=4"]) == {
        "a": 1e-3, "b": -2e5, "c": [1e-5, 2e-5], "d": "abc", "e": 4
    }


# ------------------------------------------------------------------------ overrides


def test_override_applied_and_validated():
    r = load_recipe("450m", ["pretrain.max_lr=1e-3", "pretrain.min_lr=1e-4", "instruct.lr_grid=[3e-5, 1e-4]"])
    assert (r.pretrain.max_lr, r.pretrain.min_lr) == (1e-3, 1e-4)
    assert r.instruct.lr_grid == (3e-5, 1e-4)
    assert load_recipe(r, {"model.num_layers": 10}).model.num_layers == 10


@pytest.mark.parametrize(
    "override,field,fragment",
    [
        ("pretrain.max_lr=2.0", "pretrain.max_lr", "less than or equal to 1"),
        ("pretrain.max_lr=1e-7", "pretrain.min_lr", "min_lr"),
        ("pretrain.max_lrr=1e-3", "pretrain.max_lrr", "did you mean 'max_lr'"),
        ("model.num_layers=four", "model.num_layers", "valid integer"),
        ("pretrian.max_lr=1e-3", "pretrian.max_lr", "did you mean 'pretrain'"),
        ("model.num_layers.x=1", "model.num_layers.x", "not a section"),
    ],
)
def test_bad_override_names_set(override, field, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe("450m", [override])
    match = [p for p in info.value.problems if p.field == field and fragment in p.message]
    assert match, [str(p) for p in info.value.problems]
    if match[0].field.split(".")[:2] == override.split("=")[0].split(".")[:2]:
        assert match[0].source == "--set" and match[0].line is None


def test_override_without_equals():
    with pytest.raises(UsageError, match="key=value"):
        load_recipe("tiny", ["pretrain.max_lr"])


def test_recipe_from_dict_rejects_non_mapping():
    with pytest.raises(RecipeError, match="mapping of sections"):
        recipe_from_dict([1, 2])


def test_validate_files_collects_every_file(recipe_file, tmp_path):
    good = recipe_file(name="good.yaml")
    bad1 = recipe_file(set_("model.model_dim", 100), name="bad1.yaml")
    bad2 = recipe_file(text="id: x\n", name="bad2.yaml")
    recipes, probs = validate_files([str(good), str(bad1), str(bad2), str(tmp_path / "missing.yaml")])
    assert [r.id for r in recipes] == ["tiny"]
    sources = {p.source for p in probs}
    assert {str(bad1), str(bad2), str(tmp_path / "missing.yaml")} <= sources


def test_field_problems_readable_outside_loader():
    from pydantic import ValidationError

    from elmctl.config.schema import ModelConfig

    data = load_recipe("tiny").model.model_dump()
    with pytest.raises(ValidationError, match="not divisible by head_dim"):
        ModelConfig(**{**data, "model_dim": 100})
