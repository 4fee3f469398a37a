"""`elmctl pretrain` end to end on CPU: accumulation and DDP equivalence, kill -9 + resume,
divergence, dry run, GPU errors. Tiny recipe shrunk with --set so each run takes seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from elmctl.cli.main import main
from pretrain_util import ELMCTL, ctrl_c_once_training, losses as _losses, run_cli as _cli, store as _store

SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from elmctl.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "D"
    make_demo(out, seed=0)
    return out




def _final_params(run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with _store() as s:
        r = s.get_run(run)
    latest = (Path(r.run_dir) / "checkpoints" / "latest").read_text().strip()
    return load_file(str(Path(r.run_dir) / "checkpoints" / latest / "model.safetensors"))


def test_grad_accumulation_equivalence():
    """micro-batch 1 x 4 accumulation == micro-batch 4 x 1: same gradient, same parameters after one step."""
    from elmctl.config import load_recipe
    from elmctl.model import OpenELM
    from elmctl.train import dist as D
    from elmctl.train.loop import make_train_step
    from elmctl.train.objectives import lm_objective
    from elmctl.train.optim import build_adamw

    cfg = load_recipe("tiny", ["model.context_length=32"]).model
    tokens = torch.randint(3, 259, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    runs = []
    for micro in (4, 1):
        torch.manual_seed(0)
        model = OpenELM(cfg)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        runner = D.wrap_model(model, device=torch.device("cpu"))
        opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
        grads: dict[str, torch.Tensor] = {}
        real_step = opt.step

        def spy(*a, _model=model, _grads=grads, _real=real_step, **k):  # grads as the optimizer sees them
            _grads.update({n: p.grad.clone() for n, p in _model.named_parameters()})
            return _real(*a, **k)

        opt.step = spy
        step = make_train_step(runner, opt, lm_objective(), grad_accumulation=4 // micro, grad_clip=1.0,
                               precision="fp32", device=torch.device("cpu"))
        out = step([{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, 4, micro)], 1e-3)
        runs.append((out["loss"], grads, {n: p.detach().clone() for n, p in model.named_parameters()}, init))
    (loss_a, grads_a, params_a, init), (loss_b, grads_b, params_b, _) = runs
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in params_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-8, msg=name)
        # Adam's first step is lr * g / (|g| + eps): fp32 round-off in near-zero gradient entries
        # moves a parameter by up to a few 1e-6 (0.3% of lr), hence atol 1e-5 here.
        torch.testing.assert_close(params_a[name], params_b[name], rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(params_a[name], init[name]), name  # the step did change it


def test_ddp_two_processes_equal_one(demo, home):
    common = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--max-steps", "4", *SMALL]
    one = _cli(*common, "--name", "one")
    assert one.returncode == 0, one.stderr + one.stdout
    two = _cli(*common, "--nproc", "2", "--name", "two")
    assert two.returncode == 0, two.stderr + two.stdout
    assert "2 process(es)" in two.stdout
    a, b = _losses("one"), _losses("two")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    pa, pb = _final_params("one"), _final_params("two")
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-5, msg=name)
    with _store() as s:
        assert s.get_run("two").status == "completed"
        assert (Path(s.get_run("two").run_dir) / "train.log").read_text().count("step 4/4") == 1


def test_kill9_then_resume_gives_identical_losses(demo, home):
    args = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--max-steps", "40",
            "--checkpoint-every", "4", *SMALL]
    ref = _cli(*args, "--name", "ref")
    assert ref.returncode == 0, ref.stderr
    before = set((home / "runs").iterdir())
    proc = subprocess.Popen([ELMCTL, *args, "--name", "victim"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 90
    killed = False
    while time.time() < deadline and proc.poll() is None:
        new = set((home / "runs").iterdir()) - before
        if any(list((d / "checkpoints").glob("ckpt-*[0-9]")) for d in new):
            proc.send_signal(signal.SIGKILL)  # as a crash would: no cleanup at all
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run ended before a checkpoint could be observed"
    with _store() as s:
        victim = s.get_run("victim")
        assert victim.status == "running" and victim.step < 40  # killed mid-run, left as it was
    resumed = _cli("pretrain", "--resume", "victim")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from ckpt-" in resumed.stdout
    a, b = _losses("ref"), _losses("victim")
    assert sorted(b) == list(range(1, 41))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit-identical on CPU
    with _store() as s:
        run = s.get_run("victim")
        assert run.status == "completed" and run.id == victim.id and run.run_dir == victim.run_dir
        assert [c.step for c in s.checkpoints(run.id)][-1] == 40


def test_resume_refuses_topology_change_and_detects_corruption(demo, home):
    args = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--max-steps", "4",
            "--checkpoint-every", "2", *SMALL, "--name", "r"]
    assert _cli(*args).returncode == 0
    changed = _cli("pretrain", "--resume", "r", "--nproc", "2", "--max-steps", "6")
    assert changed.returncode == 2
    assert "processes: checkpoint 1, this launch 2" in changed.stderr and "--allow-topology-change" in changed.stderr
    run_dir = Path(_store().get_run("r").run_dir)
    model = run_dir / "checkpoints" / "ckpt-4" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    res = _cli("pretrain", "--resume", "r", "--max-steps", "6")
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout + res.stderr
    assert "corrupted" in out and "resuming from ckpt-2" in out
    assert sorted(_losses("r")) == [1, 2, 3, 4, 5, 6]


def test_nan_stops_as_diverged(demo, home, monkeypatch, capsys):
    from elmctl.train.pretrain import run as P

    real = P.lm_objective

    def poisoned(**kw):  # the loss turns NaN from the 6th training micro-batch on
        objective, calls = real(**kw), {"n": 0}

        def f(model, batch):
            loss, metrics = objective(model, batch)
            calls["n"] += model.training
            return (loss * float("nan") if calls["n"] > 5 else loss), metrics

        return f

    monkeypatch.setattr(P, "lm_objective", poisoned)
    code = main(["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--max-steps", "30",
                 "--checkpoint-every", "2", *SMALL, "--name", "boom"])
    assert code == 1
    assert "diverged" in capsys.readouterr().err
    with _store() as s:
        run = s.get_run("boom")
        assert run.status == "diverged" and run.step == 6
        assert "NaN/inf" in run.error and "last good checkpoint ckpt-4" in run.error
        assert [c.step for c in s.checkpoints(run.id)] == [2, 4]  # nothing saved after the bad step
    assert (Path(run.run_dir) / "checkpoints" / "latest").read_text().strip() == "ckpt-4"


def test_dry_run_writes_nothing(demo, home, tmp_path, capsys):
    code = main(["pretrain", "--recipe", "tiny", "--device", "cpu", "--nproc", "2", "--data", str(demo), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 micro-batch x 1 accumulation x 2 process(es) = 8 sequences" in out
    assert "torch.distributed.run" in out and "--nproc-per-node=2" in out and "nothing was written" in out
    assert not home.exists()


def test_missing_and_busy_gpus(demo, home, monkeypatch, capsys):
    from elmctl.launch import gpus, locks

    monkeypatch.setattr(gpus, "discover", lambda: [])
    assert main(["pretrain", "--recipe", "tiny", "--data", str(demo)]) == 2
    assert "no GPU found" in capsys.readouterr().err
    fake = [gpus.GpuInfo(0, "NVIDIA H100 80GB HBM3", 80.0, "GPU-0")]
    monkeypatch.setattr(gpus, "discover", lambda: fake)
    with locks.acquire([0], "someone-else"):
        assert main(["pretrain", "--recipe", "tiny", "--data", str(demo), "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert "someone-else" in err and "--wait" in err
    with _store() as s:
        assert [r.status for r in s.list_runs()] == ["failed"]  # never left queued


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_checkpoints_and_cancels_then_resumes(demo, home, nproc):
    args = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--max-steps", "40",
            "--checkpoint-every", "100", *SMALL, "--name", "cc", "--nproc", str(nproc)]
    code, out, err = ctrl_c_once_training(args, "cc")
    assert code == 0, out + err
    assert "cancelled" in out and "--resume cc" in out
    assert "Traceback" not in out + err  # torchrun's agent shutdown stays in train.log
    with _store() as s:
        run = s.get_run("cc")
        assert run.status == "cancelled" and 0 < run.step < 40
        assert [c.step for c in s.checkpoints(run.id)] == [run.step]  # saved at the stop step
    resumed = _cli("pretrain", "--resume", "cc")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert sorted(_losses("cc")) == list(range(1, 41))
    with _store() as s:
        assert s.get_run("cc").status == "completed"
