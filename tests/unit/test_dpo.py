"""DPO / hinge / SFT objectives against hand-computed values, and their training-step invariants."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from elmctl.data import IGNORE_INDEX
from elmctl.train.dpo import (
    dpo_losses,
    preference_metrics,
    sequence_logps,
    sft_loss,
    split_pair_logps,
)

# Two pairs, beta 0.5 (numbers chosen so every quantity is easy to do by hand):
#   pair 1: policy (-1, -3), ref (-2, -2): z = 2,  beta z = 1
#   pair 2: policy (-4, -1), ref (-2, -2): z = -3, beta z = -1.5
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_sigmoid_loss_rewards_accuracy_margin_by_hand():
    losses, cr, rj = dpo_losses(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid")
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1.5) = log(1 + e^1.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(1.5))], abs=1e-6)
    assert cr.tolist() == pytest.approx([0.5, -1.0])  # 0.5 * (-1 - -2), 0.5 * (-4 - -2)
    assert rj.tolist() == pytest.approx([-0.5, 0.5])
    assert float(losses.mean()) == pytest.approx((0.313262 + 1.701413) / 2, abs=1e-5)
    m = preference_metrics(cr, rj)
    assert float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_margin"]) == pytest.approx((1.0 + -1.5) / 2)


def test_hinge_loss_by_hand():
    losses, _, _ = dpo_losses(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 2.5])  # max(0, 1 - 1), max(0, 1 + 1.5)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    losses, cr, rj = dpo_losses(PC, PR, PC, PR, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert float(preference_metrics(cr, rj)["reward_accuracy"]) == 0.0  # ties are not wins (TRL: r_w > r_l)


def test_loss_gradient_flows_to_policy_only():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc, rr = RC.clone().requires_grad_(), RR.clone().requires_grad_()
    losses, cr, _ = dpo_losses(pc, pr, rc, rr, beta=0.5)
    losses.mean().backward()
    # d/dpc of -log sigmoid(beta z) / 2 = -beta * sigmoid(-beta z) / 2
    expect = [-0.5 * (1 / (1 + math.exp(1))) / 2, -0.5 * (1 / (1 + math.exp(-1.5))) / 2]
    assert pc.grad.tolist() == pytest.approx(expect, abs=1e-6)
    assert not cr.requires_grad


def test_sequence_logps_sums_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX, 4]])
    lp = torch.log_softmax(logits, -1)
    expect = [lp[0, 1, 3] + lp[0, 2, 1], lp[1, 0, 0] + lp[1, 3, 4]]
    assert sequence_logps(logits, labels).tolist() == pytest.approx([float(e) for e in expect], abs=1e-5)
    chosen, rejected = split_pair_logps(torch.arange(4.0))
    assert chosen.tolist() == [0.0, 1.0] and rejected.tolist() == [2.0, 3.0]


def test_sft_masks_prompt_and_padding():
    V = 7
    logits = torch.zeros(1, 5, V)  # uniform: every scored token costs log V
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 2, IGNORE_INDEX]])
    assert float(sft_loss(logits, labels)) == pytest.approx(math.log(V))
    changed = logits.clone()
    changed[0, 0] = torch.randn(V) * 10  # prompt position
    changed[0, 4] = torch.randn(V) * 10  # padding position
    assert float(sft_loss(changed, labels)) == pytest.approx(math.log(V))
    changed[0, 2, 4] = 3.0  # an answer position does count
    assert float(sft_loss(changed, labels)) < math.log(V)


def test_unknown_loss_and_bad_beta():
    with pytest.raises(ValueError):
        dpo_losses(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError):
        dpo_losses(PC, PR, RC, RR, beta=0.0)


# ------------------------------------------------------------------ objective in the training step


def _pairs(n: int, seed: int = 0):
    from elmctl.data.preference import PreferencePair

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = np.concatenate([[1], rng.integers(3, 40, rng.integers(3, 8))]).astype(np.int64)
        c = np.concatenate([rng.integers(3, 40, rng.integers(1, 5)), [2]]).astype(np.int64)
        r = np.concatenate([rng.integers(3, 40, rng.integers(1, 5)), [2]]).astype(np.int64)
        out.append(PreferencePair(p, c, r))
    return out


def _setup(loss: str = "sigmoid", seed: int = 0):
    import elmctl
    from elmctl.train import dist as D
    from elmctl.train.optim import build_adamw
    from elmctl.train.tune.run import make_objective

    torch.manual_seed(seed)
    model = elmctl.build_model("tiny", num_layers=2)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    runner = D.wrap_model(model, device=torch.device("cpu"))
    opt = build_adamw(model, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    return model, ref, runner, opt, make_objective(loss, 0.1, ref)


def _step_fn(runner, opt, objective, accum):
    from elmctl.train.loop import make_train_step

    return make_train_step(runner, opt, objective, grad_accumulation=accum, grad_clip=1.0, precision="fp32",
                           device=torch.device("cpu"))


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "sft"])
def test_gradient_accumulation_equivalence(loss):
    """micro-batch 4 x accumulation 1 == micro-batch 2 x accumulation 2 == 1 x 4 (same pairs, same order)."""
    from elmctl.train.tune.batches import PairBatches

    pairs = _pairs(8)
    finals = []
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        model, ref, runner, _, objective = _setup(loss)
        # plain SGD: the update is lr x gradient, so equal parameters mean equal accumulated gradients
        # (Adam would turn 1e-9 rounding differences of near-zero gradients into full-size steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = PairBatches(pairs, micro_batch=micro, grad_accumulation=accum, pad_id=259, seed=3,
                              sft=loss == "sft")
        step = _step_fn(runner, opt, objective, accum)
        for _ in range(2):
            out = step([batches.next_batch() for _ in range(accum)], 1e-2)
        finals.append(({k: v.clone() for k, v in model.state_dict().items()}, float(out["loss"])))
    for state, loss_value in finals[1:]:
        assert loss_value == pytest.approx(finals[0][1], rel=1e-4, abs=1e-6)
        for k, v in state.items():
            torch.testing.assert_close(v, finals[0][0][k], rtol=1e-5, atol=1e-6)


def test_training_changes_every_parameter_and_not_the_reference():
    from elmctl.train.tune.batches import PairBatches

    model, ref, runner, opt, objective = _setup("sigmoid")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    batches = PairBatches(_pairs(16), micro_batch=4, grad_accumulation=1, pad_id=259, seed=0)
    step = _step_fn(runner, opt, objective, 1)
    for _ in range(3):
        out = step([batches.next_batch()], 1e-2)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert all(not p.requires_grad for p in ref.parameters())
    assert {"reward_accuracy", "reward_margin"} <= set(out)


def test_tune_plan_keeps_effective_batch():
    from elmctl.config import load_recipe
    from elmctl.config.plan import tune_plan
    from elmctl.errors import UsageError

    r = load_recipe("270m")  # 8 x 2 x 8 = 128
    assert r.instruct.effective_batch == 128
    for world in (1, 2, 4, 8, 16):
        p = tune_plan(r, world, on_gpu=False)
        assert p.micro_batch * p.grad_accumulation * world == 128 and p.micro_batch <= 8
    p = tune_plan(r, 8, on_gpu=False)
    assert (p.micro_batch, p.grad_accumulation) == (8, 2)
    with pytest.raises(UsageError, match="effective batch 128 .* does not split over 3 processes"):
        tune_plan(r, 3, on_gpu=False)
