"""The loop's tokens/s counts the tokens actually fed, so variable-length batches (DPO) report it too."""

from __future__ import annotations

import pytest
import torch

from elmctl.model.openelm import build_model
from elmctl.train import dist as D
from elmctl.train.loop import Hooks, LoopConfig, train
from elmctl.train.objectives import lm_objective
from elmctl.train.optim import build_adamw


class VariableLength:
    """Micro-batches of 2 rows whose length cycles through ``lengths`` (like padded DPO pairs)."""

    def __init__(self, lengths):
        self.lengths, self.i = lengths, 0

    def next_batch(self):
        T = self.lengths[self.i % len(self.lengths)]
        self.i += 1
        ids = torch.randint(0, 259, (2, T))
        return {"input_ids": ids, "labels": ids}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


@pytest.mark.parametrize("accum", [1, 2])
def test_tokens_per_s_counts_the_fed_tokens(accum):
    torch.manual_seed(0)
    runner = D.wrap_model(build_model("tiny"), device=torch.device("cpu"))
    opt = build_adamw(D.raw_model(runner), lr=1e-3)
    logs: dict[int, dict] = {}
    lengths = [8, 24, 16]
    cfg = LoopConfig(max_steps=6, grad_accumulation=accum, log_every=3, tokens_per_step=999_999)
    res = train(runner, opt, lm_objective(), VariableLength(lengths), cfg, lr_at=lambda s: 1e-3,
                device=torch.device("cpu"), hooks=Hooks(on_log=lambda s, m: logs.__setitem__(s, m)))
    assert res.status == "completed"
    fed = [2 * lengths[i % 3] for i in range(6 * accum)]  # tokens per micro-batch, in order
    per_step = [sum(fed[s * accum:(s + 1) * accum]) for s in range(6)]
    for end in (3, 6):  # log boundaries: tokens/s x seconds per step x steps = tokens in the interval
        m = logs[end]
        tokens = m["tokens_per_s"] * m["step_time_s"] * 3
        assert tokens == pytest.approx(sum(per_step[end - 3:end]), rel=1e-6)
    assert "tokens_per_s" not in logs[1]  # only the last step of an interval carries throughput
