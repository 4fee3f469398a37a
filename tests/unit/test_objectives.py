"""LM loss: chunked == naive full-logits computation; z-loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from elmctl.data import IGNORE_INDEX
from elmctl.train.objectives import chunked_lm_loss, naive_lm_loss, shift_labels


def test_hand_computed_ce_and_z_loss():
    # One position, logits [0, ln 3] over V=2 (h = [1], W = [[0], [ln 3]]): softmax = [1/4, 3/4].
    h = torch.tensor([[[1.0]]])
    w = torch.tensor([[0.0], [math.log(3.0)]])
    y = torch.tensor([[1]])
    loss, ce, z = chunked_lm_loss(h, w, y, z_loss_coef=1e-4)
    lse = math.log(1 + 3)
    assert ce.item() == pytest.approx(lse - math.log(3.0), abs=1e-6)  # = ln(4/3)
    assert z.item() == pytest.approx(1e-4 * lse**2, rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + z.item(), rel=1e-6)


def test_ignored_positions_are_excluded_from_both_terms():
    torch.manual_seed(0)
    h = torch.randn(1, 4, 8)
    w = torch.randn(16, 8)
    y = torch.tensor([[3, IGNORE_INDEX, 5, IGNORE_INDEX]])
    _, ce, z = chunked_lm_loss(h, w, y, z_loss_coef=1e-4)
    _, ce_kept, z_kept = chunked_lm_loss(h[:, [0, 2]], w, y[:, [0, 2]], z_loss_coef=1e-4)
    assert ce.item() == pytest.approx(ce_kept.item(), rel=1e-6)
    assert z.item() == pytest.approx(z_kept.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_matches_naive_values_and_grads(chunk):
    torch.manual_seed(1)
    B, T, D, V = 3, 11, 16, 40
    h = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :3] = IGNORE_INDEX
    loss, ce, z = chunked_lm_loss(h, w, y, z_loss_coef=1e-2, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ce_ref, z_ref = naive_lm_loss(h @ w.t(), y, z_loss_coef=1e-2)
    gh_ref, gw_ref = torch.autograd.grad(ce_ref + z_ref, (h, w))
    torch.testing.assert_close(ce, ce_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, z_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-10)


def test_no_grad_path_and_shift_labels():
    tokens = torch.tensor([[5, 6, 7, 9, 9]])
    ids, labels = shift_labels(tokens, pad_id=9)
    assert ids.tolist() == [[5, 6, 7, 9]]
    assert labels.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    with torch.no_grad():
        loss, ce, z = chunked_lm_loss(torch.randn(1, 4, 8, requires_grad=True), torch.randn(12, 8), labels)
    assert not loss.requires_grad and torch.isfinite(loss)
