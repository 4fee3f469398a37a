"""One weights resolver (elmctl.train.weights) behind `generate`, `export` and `tune --base`."""

from __future__ import annotations

import json

import pytest

from elmctl.errors import UsageError


def _save_tiny(run_dir, step):
    import torch

    from elmctl.train.checkpoint import save_checkpoint

    return save_checkpoint(run_dir, step=step, model_state={"w": torch.ones(2)},
                           optimizer_state={"state": {}, "param_groups": []}, train_state={"step": step}, keep=2)


def test_run_folder_checkpoint_folder_and_base_resolve_alike(tmp_path):
    from elmctl.train.tune.inputs import resolve_base
    from elmctl.train.weights import ModelSource, resolve_source

    run = tmp_path / "run"
    _save_tiny(run, 1)
    info = _save_tiny(run, 2)
    (run / "recipe.json").write_text("{}")
    (run / "options.json").write_text(json.dumps({"run_id": "abc"}))
    for spec in (run, info.path):
        src = resolve_source(str(spec))
        base = resolve_base(str(spec))
        assert isinstance(base, ModelSource) and (src.kind, base.kind) == ("checkpoint", "checkpoint")
        assert src.path.resolve() == base.path == info.path.resolve() and base.path.is_absolute()
        assert (src.step, src.run_id, src.run_kind, src.run_dir) == (2, "abc", "pretrain", run)


def test_corrupted_checkpoint_is_an_input_error_for_every_command(tmp_path):
    from elmctl.train.tune.inputs import resolve_base
    from elmctl.train.weights import resolve_source

    run = tmp_path / "run"
    info = _save_tiny(run, 2)
    with open(info.path / "model.safetensors", "ab") as f:
        f.write(b"garbage")
    for spec in (run, info.path):
        with pytest.raises(UsageError, match="corrupt"):
            resolve_source(str(spec))
        with pytest.raises(UsageError, match=r"^--base .*corrupt"):
            resolve_base(str(spec))


def test_checkpoint_without_its_recipe_is_weights_only(tmp_path):
    """tune --base needs only the weights; generate/export need the recipe to build the model."""
    from elmctl.train.weights import load_model, resolve_source

    info = _save_tiny(tmp_path / "run", 3)
    src = resolve_source(str(info.path))
    assert src.run_dir is None and src.step == 3
    with pytest.raises(UsageError, match="no recipe.json"):
        load_model(src)


def test_folder_without_weights(tmp_path):
    from elmctl.train.tune.inputs import resolve_base
    from elmctl.train.weights import resolve_source

    with pytest.raises(UsageError, match="holds no model"):
        resolve_source(str(tmp_path))
    with pytest.raises(UsageError, match=r"^--base .* holds no model"):
        resolve_base(str(tmp_path))
