"""The typed run folder, the worker entry point's command line and its signal / exit-code contract (#12)."""

from __future__ import annotations

import json
import os
import signal
import sys
from types import SimpleNamespace

import pytest

from elmctl.config import load_recipe
from elmctl.train import run_folder
from elmctl.train.run_folder import PretrainOptions, TuneOptions


def _tune(**kw):
    base = dict(run_id="r1", device="cpu", base_kind="checkpoint", base_path="/b/ckpt-4", base_label="b",
                data_dir="/d", lr=1e-3, epochs=2, loss="sigmoid", micro_batch=4, grad_accumulation=2)
    return TuneOptions(**{**base, **kw})


def test_options_round_trip_through_the_folder(tmp_path):
    rec = load_recipe("tiny")
    opts = _tune(resume_from=["r0"], resume={"run_id": "r0", "step": 4}, resume_notes=["n"], identity={"lr": 1e-3})
    run_folder.write(tmp_path, rec, opts)
    assert json.loads((tmp_path / "options.json").read_text())["job"] == "tune"
    got_rec, got = run_folder.read(tmp_path)
    assert got == opts and got_rec == rec
    pre = PretrainOptions(run_id="p", data_dir="/d", device="cpu", micro_batch=2, grad_accumulation=1, seq_len=8,
                          max_steps=3)
    run_folder.write_options(tmp_path, pre)
    assert run_folder.read_options(tmp_path) == pre


def test_folders_written_before_typed_options_still_read(tmp_path):
    # pre-#12 options.json: no "job"; tune's resume_from a comma string or null; keys since removed
    old_tune = {"run_id": "r1", "store_url": "sqlite:///x.db", "device": "cpu", "base_kind": "hf", "base_path": "/b",
                "base_label": "b", "data_dir": "/d", "lr": 1e-3, "epochs": 2, "loss": "sigmoid", "micro_batch": 4,
                "grad_accumulation": 2, "precompute_ref": False, "study": None, "trial": None, "identity": None,
                "resume_from": "r1,r0", "resume": None, "resume_notes": None}
    (tmp_path / "options.json").write_text(json.dumps(old_tune))
    got = run_folder.read_options(tmp_path)
    assert isinstance(got, TuneOptions) and got.resume_from == ["r1", "r0"] and got.resume_notes == []
    old_pretrain = {"run_id": "p", "store_url": None, "data_dir": "/d", "device": "cpu", "gpus_arg": None, "nproc": 2,
                    "world_size": 2, "micro_batch": 2, "grad_accumulation": 1, "seq_len": 8, "max_steps": 3,
                    "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "compile": False, "resume": True,
                    "no_longer_a_field": 1}
    (tmp_path / "options.json").write_text(json.dumps(old_pretrain))
    got = run_folder.read_options(tmp_path)
    assert isinstance(got, PretrainOptions) and got.resume and got.nproc == 2 and got.eval_sequences == 64


def test_worker_command_is_the_one_entry_point():
    from elmctl.train.tune.launcher import worker_command

    one = SimpleNamespace(plan=SimpleNamespace(world=1), run_dir="/runs/r1")
    assert worker_command(one) == [sys.executable, "-m", "elmctl.train.worker", "tune", "/runs/r1"]
    two = SimpleNamespace(plan=SimpleNamespace(world=2), run_dir="/runs/r1")
    cmd = worker_command(two, master_port=29555)
    assert "--master-port=29555" in cmd and "--nproc-per-node=2" in cmd
    assert cmd[-4:] == ["-m", "elmctl.train.worker", "tune", "/runs/r1"]


def test_exit_codes_and_bad_worker_arguments(capsys):
    from elmctl.train import worker

    assert [worker.exit_code(s) for s in ("completed", "cancelled", "failed", "diverged")] == [0, 130, 1, 1]
    assert worker.main(["nonsense"]) == 2 and worker.main(["tune"]) == 2
    assert "usage: python -m elmctl.train.worker" in capsys.readouterr().err


def test_first_signal_stops_second_raises_in_process_only():
    from elmctl.train.worker import stop_on_signals

    told = []
    with stop_on_signals(lambda: told.append(1)) as should_stop:
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop() and told == [1]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with stop_on_signals(escalate=False) as should_stop:  # a worker: the supervisor escalates
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_check_lr_is_the_one_range_check():
    from elmctl.errors import UsageError
    from elmctl.sweep.cells import parse_lrs
    from elmctl.train.tune.launcher import check_lr

    assert check_lr(3e-5) == 3e-5
    for bad in (0.0, 1.0, float("nan"), -1e-3):
        with pytest.raises(UsageError, match="must lie in"):
            check_lr(bad)
    with pytest.raises(UsageError, match=r"--lrs: learning rate 1: must lie in \(0, 1\)"):
        parse_lrs("1e-3,1")


@pytest.mark.parametrize("text, said", [("{not json", "not valid JSON"), ("[1]", "not the options of an elmctl run"),
                                        ('{"job": "eval"}', "not the options of an elmctl run"),
                                        ('{"run_id": "r1"}', "lacks data_dir, device")])
def test_damaged_options_are_an_input_error(tmp_path, text, said):
    from elmctl.errors import UsageError

    (tmp_path / "options.json").write_text(text)
    with pytest.raises(UsageError, match=said):
        run_folder.read_options(tmp_path)


def test_epoch_eval_round_trips_and_a_damaged_one_is_an_input_error(tmp_path):
    """tune-sweep --eval-tasks reaches the trial's worker through the typed folder, nothing else."""
    from elmctl.errors import UsageError
    from elmctl.train.run_folder import EpochEval

    ev = EpochEval(tasks="openelm-zero-shot,demo_compare", metric="openelm-zero-shot/avg",
                   include_path=("/t/a", "/t/b"), limit=50, batch_size=8)
    run_folder.write(tmp_path, load_recipe("tiny"), _tune(epoch_eval=ev))
    assert run_folder.read_options(tmp_path).epoch_eval == ev
    data = json.loads((tmp_path / "options.json").read_text())
    for bad in ([1], {"metric": "x/acc"}, {"tasks": 3}):
        (tmp_path / "options.json").write_text(json.dumps({**data, "epoch_eval": bad}))
        with pytest.raises(UsageError, match="damaged epoch_eval"):
            run_folder.read_options(tmp_path)
