"""Which earlier attempt a retried cell resumes from, and how the choice reads (pure parts)."""

from __future__ import annotations

from types import SimpleNamespace

from elmctl.sweep import resume as R
from elmctl.train.tune import resume as T
from elmctl.sweep.cells import Cell, cell_of


def _t(number, state, lr=1e-3, epochs=2, **attrs):
    return SimpleNamespace(number=number, state=SimpleNamespace(name=state), params={"lr": lr, "epochs": epochs},
                           user_attrs={"run_id": f"r{number}", **attrs})


def test_candidates_are_earlier_failed_attempts_of_the_cell_with_checkpoints_furthest_first():
    trials = [
        _t(0, "FAIL", fail_reason="error"),  # checkpoint at step 4
        _t(1, "FAIL", fail_reason="orphaned"),  # step 6 (stopped mid-epoch when its driver died)
        _t(2, "FAIL", fail_reason="interrupted"),  # no checkpoint: died at start
        _t(3, "FAIL", fail_reason="claim-conflict"),  # never ran
        _t(4, "FAIL", lr=1e-4, fail_reason="error"),  # another cell
        _t(5, "RUNNING"),  # the attempt being started
        _t(6, "FAIL", fail_reason="error"),  # also step 4, newer than trial 0
    ]
    steps = {"r0": 4, "r1": 6, "r3": 8, "r4": 8, "r5": 2, "r6": 4}
    got = R.resume_candidates(trials, Cell(1e-3, 2), steps.get, cell_of)
    assert got == ["r1", "r6", "r0"]
    assert R.resume_candidates(trials, Cell(1e-5, 2), steps.get, cell_of) == []


def test_describe():
    point = {"run_id": "ab", "trial": 0, "attempt": 1, "step": 4, "epoch": 1, "steps_per_epoch": 4}
    assert T.describe(point) == "attempt 1 (trial 0), epoch 1 (step 4)"
    assert T.describe({**point, "step": 5}) == "attempt 1 (trial 0), epoch 1 + 1 step (step 5)"
    assert T.describe({"run_id": "ab", "step": 7, "epoch": 1, "steps_per_epoch": 4}) == "run ab, epoch 1 + 3 steps (step 7)"


def test_compare_lists_every_difference():
    identity = {"lr": 1e-3, "epochs": 2, "seed": 42, "data_manifest": "aa"}
    meta = {"kind": "tune", "resume": dict(identity), "world_size": 1, "global_batch": 8, "micro_batch": 8,
            "grad_accumulation": 1}
    topo = {"world_size": 1, "global_batch": 8, "micro_batch": 8, "grad_accumulation": 1}
    assert T.compare(meta, identity, topo) == []
    diffs = T.compare(meta, {**identity, "seed": 7, "data_manifest": "bb"}, {**topo, "micro_batch": 4, "grad_accumulation": 2})
    assert diffs == ["seed: checkpoint 42, this trial 7", "data (manifest checksum): checkpoint 'aa', this trial 'bb'",
                     "micro-batch: checkpoint 8, this trial 4", "gradient accumulation: checkpoint 1, this trial 2"]
    assert "older elmctl" in T.compare({**meta, "resume": None}, identity, topo)[0]
