"""Parity with an independent implementation: Apple's MLX port of OpenELM (facts §8).

elmctl exports the HF layout; ``mlx_lm.utils.load_model`` builds its own OpenELM from config.json and
model.safetensors only (no tokenizer, nothing downloaded). Both run the same token ids in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import elmctl

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")


def _max_abs_diff(model, folder, seq: int, seed: int) -> float:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids)[..., :vocab].numpy()
    mlx_model, mlx_config = mlx_utils.load_model(folder)
    assert mlx_config["model_type"] == "openelm"
    out = np.array(mlx_model(mx.array(ids.numpy())).astype(mx.float32))
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max())


def test_mlx_parity_tiny(tmp_path):
    torch.manual_seed(0)
    model = elmctl.build_model("tiny")
    with torch.no_grad():  # exercise the norm weights too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    elmctl.save_pretrained(model, tmp_path)
    diff = _max_abs_diff(model, tmp_path, seq=64, seed=1)
    assert diff < 1e-4, diff


@pytest.mark.slow  # builds, writes (1.1 GB fp32) and reloads the full 270M model: ~20 s idle, more under load
def test_mlx_parity_270m(tmp_path):
    torch.manual_seed(0)
    model = elmctl.build_model("270m")
    elmctl.save_pretrained(model, tmp_path)
    diff = _max_abs_diff(model, tmp_path, seq=16, seed=2)
    assert diff < 1e-4, diff
