"""Shipped recipes: all load, carry the paper's values (facts §1, §2), and `recipe show` stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from elmctl.config import available_recipes, load_recipe
from elmctl.config.loader import resolve_recipe_path

REPO = Path(__file__).resolve().parents[2]
SIZES = {  # facts §1 and §2: layers, d_model, d_h, max LR, DPO lr, epochs, loss, act ckpt, fsdp, sharding
    "270m": (16, 1280, 64, 0.0053, 2e-5, 5, "hinge", False, False, "none"),
    "450m": (20, 1536, 64, 0.0039, 3e-5, 8, "hinge", True, False, "zero3"),
    "1_1b": (28, 2048, 64, 0.0024, 5e-5, 5, "sigmoid", True, False, "zero3"),
    "3b": (36, 3072, 128, 0.0012, 1e-4, 10, "hinge", True, True, "zero3"),
}


def test_every_shipped_recipe_loads():
    ids = list(available_recipes())
    assert set(SIZES) | {"tiny"} <= set(ids)
    assert ids[:4] == ["270m", "450m", "1_1b", "3b"]
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        assert path.stem.removeprefix("openelm-") == r.id


@pytest.mark.parametrize("rid", list(SIZES))
def test_paper_values(rid):
    r = load_recipe(rid)
    layers, d, dh, max_lr, lr, epochs, loss, ckpt, fsdp, sharding = SIZES[rid]
    m, pt, it = r.model, r.pretrain, r.instruct
    assert (m.num_layers, m.model_dim, m.head_dim, m.num_gqa_groups) == (layers, d, dh, 4)
    assert (m.qkv_multipliers, m.ffn_multipliers, m.ffn_dim_divisor) == ((0.5, 1.0), (0.5, 4.0), 256)
    assert (m.norm_eps, m.rope_freq_constant, m.rope_max_length, m.context_length) == (1e-6, 10000, 4096, 2048)
    assert (m.vocab_size, m.padded_vocab_size, m.pad_token_id, m.bos_token_id, m.eos_token_id) == (32000, 32128, 32000, 1, 2)
    assert m.share_input_output_layers and m.normalize_qk_projections
    assert (pt.sequences_per_gpu, pt.num_gpus, pt.warmup_iterations, pt.max_iterations) == (16, 128, 5000, 350_000)
    assert (pt.warmup_init_lr, pt.max_lr, pt.min_lr) == (1e-6, max_lr, pytest.approx(max_lr / 10))
    assert (pt.adam_betas, pt.adam_eps, pt.weight_decay, pt.grad_clip) == ((0.9, 0.95), 1e-8, 0.1, 1.0)
    assert pt.z_loss and pt.z_loss_coef == 1e-4 and pt.precision == "bf16"
    assert (pt.activation_checkpointing, pt.fsdp) == (ckpt, fsdp)
    assert (pt.data_filters.min_chars, pt.data_filters.min_tokens) == (200, 256)
    assert (it.lr, it.epochs, it.loss, it.beta, it.sharding) == (lr, epochs, loss, 0.01, sharding)
    assert it.lr_grid == (2e-5, 3e-5, 5e-5, 8e-5, 1e-4) and it.epoch_grid == (3, 5, 8, 10)
    assert (it.per_device_batch, it.grad_accumulation, it.num_gpus, it.effective_batch) == (8, 2, 8, 128)
    assert (it.max_length, it.max_prompt_length, it.warmup_ratio, it.weight_decay, it.seed) == (1024, 512, 0.1, 0.0, 42)
    assert r.provenance.pretrain_nodes == 16 and r.provenance.pretrain_gpu_memory_gb == 80


def test_3b_hardware_provenance():
    pv = load_recipe("3b").provenance
    assert (pv.pretrain_gpu, pv.pretrain_days, pv.instruct_gpu_memory_gb, pv.instruct_hours) == ("H100", 13, 80, 14.2)


def test_tiny_recipe_matches_contract():
    m = load_recipe("tiny").model
    from elmctl.config.derived import layer_shapes

    shapes = layer_shapes(m)
    assert [s.query_heads for s in shapes] == [2, 4, 4, 4]
    assert [s.ffn_dim for s in shapes] == [64, 256, 384, 512]
    assert (m.context_length, m.vocab_size, m.padded_vocab_size, m.pad_token_id) == (256, 259, 320, 259)


@pytest.mark.parametrize("spec,rid", [("450M", "450m"), ("openelm-450m", "450m"), ("1.1b", "1_1b"), ("1b", "1_1b"), ("3B", "3b")])
def test_id_aliases(spec, rid):
    assert resolve_recipe_path(spec) == available_recipes()[rid]


def test_recipe_is_frozen_and_round_trips():
    from pydantic import ValidationError

    r = load_recipe("270m")
    with pytest.raises(ValidationError):
        r.model.num_layers = 3  # type: ignore[misc]
    again = load_recipe(r, {"pretrain.seed": 1})
    assert again.pretrain.seed == 1 and again.model == r.model


_PROBE = """
import contextlib, io, json, sys
from elmctl.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:])
print(json.dumps([rc, sorted(m for m in ("torch", "optuna", "sqlalchemy", "matplotlib") if m in sys.modules)]))
"""


@pytest.mark.parametrize("argv", [["--help"], ["recipe", "show", "450m"], ["recipe", "show", "3b", "--gpus", "8", "-f", "json"]])
def test_fast_paths_import_no_heavy_modules(argv):
    # Fresh interpreter: torch (2 s) or optuna (0.3 s) on these paths would break the 0.3 s budget.
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rc, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0 and heavy == []
