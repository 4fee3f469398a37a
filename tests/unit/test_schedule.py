"""LR schedule (CoreNet cosine, facts §1) and weight-decay groups, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from elmctl.config import load_recipe
from elmctl.train.optim import build_adamw, param_groups
from elmctl.train.schedule import corenet_cosine, pretrain_schedule, warmup_decay

# The 270M recipe: warm-up 5000 from 1e-6 to 5.3e-3, cosine to 5.3e-4 over 350k iterations.
KW = dict(warmup_iterations=5000, max_iterations=350_000, warmup_init_lr=1e-6, max_lr=5.3e-3, min_lr=5.3e-4)


def test_warmup_is_linear_from_init_lr():
    assert corenet_cosine(0, **KW) == pytest.approx(1e-6)
    assert corenet_cosine(2500, **KW) == pytest.approx(1e-6 + 2500 * (5.3e-3 - 1e-6) / 5000)
    assert corenet_cosine(4999, **KW) == pytest.approx(1e-6 + 4999 * (5.3e-3 - 1e-6) / 5000)


def test_cosine_with_period_max_minus_warmup_plus_one():
    period = 350_000 - 5000 + 1
    assert corenet_cosine(5000, **KW) == pytest.approx(5.3e-3)
    t = 100_000 - 5000
    expect = 5.3e-4 + 0.5 * (5.3e-3 - 5.3e-4) * (1 + math.cos(math.pi * t / period))
    assert corenet_cosine(100_000, **KW) == pytest.approx(expect, rel=1e-12)
    # Halfway through the period: exactly the mean of max and min.
    assert corenet_cosine(5000 + period / 2, **KW) == pytest.approx((5.3e-3 + 5.3e-4) / 2)
    # The last iteration sits just above min_lr (the +1 in the period).
    last = corenet_cosine(350_000, **KW)
    assert 5.3e-4 < last < 5.3e-4 + 1e-12
    assert corenet_cosine(400_000, **KW) == pytest.approx(5.3e-4)  # clamped past the end


def test_recipe_schedule_and_hf_warmup_decay():
    lr = pretrain_schedule(load_recipe("270m").pretrain)
    assert lr(0) == pytest.approx(1e-6) and lr(5000) == pytest.approx(5.3e-3)
    assert warmup_decay(5, total_steps=110, warmup_steps=10, peak_lr=1e-4) == pytest.approx(5e-5)
    assert warmup_decay(60, total_steps=110, warmup_steps=10, peak_lr=1e-4) == pytest.approx(5e-5)
    assert warmup_decay(60, total_steps=110, warmup_steps=10, peak_lr=1e-4, kind="linear") == pytest.approx(5e-5)
    assert warmup_decay(110, total_steps=110, warmup_steps=10, peak_lr=1e-4) == pytest.approx(0.0)


def test_weight_decay_groups_exclude_1d_params():
    from elmctl.model import OpenELM

    model = OpenELM(load_recipe("tiny").model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names_1d = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("norm" in n for n in names_1d) and all("norm" in n for n in names_1d)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)
    # A decayed step shrinks a 2-D weight with zero gradient; a 1-D one is untouched.
    w2, w1 = decay["params"][0], no_decay["params"][0]
    before2, before1 = w2.detach().clone(), w1.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w2.detach(), before2 * (1 - 1e-3 * 0.1))
    torch.testing.assert_close(w1.detach(), before1)
