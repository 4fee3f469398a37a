"""`elmctl pretrain` with FSDP2 and with nodes started by hand, end to end on CPU (gloo).

FSDP2 (`pretrain.fsdp: true`, the 3B recipe's setting) must train like DDP, write a normal full
checkpoint (OpenELM names, loadable by `elmctl generate` / `elmctl.load_pretrained`) and resume
after Ctrl-C with the losses of an uninterrupted run. `--nnodes/--node-rank/--rdzv-endpoint`:
two elmctl processes on this machine form one 2-process job; node 0 owns the run (metrics,
checkpoints), node 1 keeps a linked record of its own. Tiny recipe shrunk with --set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from elmctl.cli.main import main
from pretrain_util import ELMCTL, ctrl_c_once_training, losses as _losses, run_cli as _cli, store as _store

SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]
STEPS = 12


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from elmctl.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "D"
    make_demo(out, seed=0)
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One store for the module: the reference runs are trained once and compared against."""
    root = tmp_path_factory.mktemp("dist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELMCTL_HOME", str(root / "home"))
        mp.delenv("ELMCTL_STORE", raising=False)
        mp.setenv("ELMCTL_LOCK_DIR", str(root / "locks"))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield root / "home"


def _latest_ckpt(run: str) -> Path:
    with _store() as s:
        r = s.get_run(run)
    root = Path(r.run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def _train(demo: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    res = _cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--nproc", "2",
               "--max-steps", str(STEPS), "--checkpoint-every", "100", *SMALL, "--name", name, *extra)
    assert res.returncode == 0, res.stderr + res.stdout
    return res


@pytest.fixture(scope="module")
def refs(demo, home) -> dict[str, dict[int, float]]:
    """Uninterrupted runs of STEPS steps: DDP ("ddp") and FSDP2 ("fsdp"), two gloo processes each."""
    _train(demo, "ddp")
    fsdp = _train(demo, "fsdp", "--set", "pretrain.fsdp=true")
    assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in fsdp.stdout
    return {"ddp": _losses("ddp"), "fsdp": _losses("fsdp")}


def test_fsdp_trains_like_ddp_and_writes_a_full_checkpoint(refs, home):
    ddp, fsdp = refs["ddp"], refs["fsdp"]
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    # fp32 on CPU: only the summation order differs (FSDP reduce-scatters gradient shards and
    # sums per-shard norms for clipping; DDP all-reduces buckets). Measured over 40 steps: max
    # relative loss difference 4.1e-7 (1-3 float32 ulps, no drift; half the steps bit-equal),
    # grad norm 2.4e-6, parameters 4.3e-7 absolute. 1e-5 leaves a 25x margin.
    rel = max(abs(fsdp[s] - ddp[s]) / abs(ddp[s]) for s in ddp)
    assert rel < 1e-5, rel
    with _store() as s:
        run = s.get_run("fsdp")
        assert run.status == "completed" and run.step == STEPS
        assert [c.step for c in s.checkpoints(run.id)] == [STEPS]
    from safetensors.torch import load_file

    full, ref = load_file(str(_latest_ckpt("fsdp") / "model.safetensors")), load_file(
        str(_latest_ckpt("ddp") / "model.safetensors"))
    assert sorted(full) == sorted(ref)  # full tensors under OpenELM's names, not shards or DTensors
    assert "token_embeddings.weight" in full and "layers.3.ffn.proj_2.weight" in full
    for name, t in ref.items():
        assert full[name].shape == t.shape, name
        torch.testing.assert_close(full[name], t, rtol=1e-4, atol=1e-5, msg=name)
    optim = torch.load(_latest_ckpt("fsdp") / "optimizer.pt", weights_only=True)
    assert optim["state"] and all(not type(v).__name__.startswith("DTensor")
                                  for st in optim["state"].values() for v in st.values())


def test_fsdp_checkpoint_loads_for_generate_and_export(refs, home, tmp_path, capsys):
    import elmctl
    from elmctl.cli.export import export_run

    assert main(["generate", "fsdp", "--prompt", "1+1=", "-n", "4", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == f"run fsdp (ckpt-{STEPS})"
    export_run("fsdp", tmp_path / "hf")
    model = elmctl.load_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 52, 46, 52, 64]])
    export_run("ddp", tmp_path / "hf_ddp")
    other = elmctl.load_pretrained(tmp_path / "hf_ddp").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), rtol=1e-3, atol=1e-3)


def test_fsdp_ctrl_c_then_resume_matches_uninterrupted(refs, demo, home):
    args = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--nproc", "2",
            "--max-steps", str(STEPS), "--checkpoint-every", "100", *SMALL, "--set", "pretrain.fsdp=true",
            "--name", "fcc"]
    code, out, err = ctrl_c_once_training(args, "fcc")
    assert code == 0, out + err
    assert "cancelled" in out and "Traceback" not in out + err
    with _store() as s:
        run = s.get_run("fcc")
        assert run.status == "cancelled" and 0 < run.step < STEPS
        assert [c.step for c in s.checkpoints(run.id)] == [run.step]  # the sharded state, gathered
    resumed = _cli("pretrain", "--resume", "fcc")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resumed from ckpt-{run.step}" in resumed.stdout and "FSDP2" in resumed.stdout
    got = _losses("fcc")
    assert [got[s] for s in sorted(got)] == [refs["fsdp"][s] for s in sorted(refs["fsdp"])]  # bit-identical
    with _store() as s:
        assert s.get_run("fcc").status == "completed"


def _port() -> int:
    from elmctl.launch.torchrun import free_port

    return free_port()


def test_two_nodes_started_by_hand_form_one_job(refs, demo, home):
    endpoint = f"127.0.0.1:{_port()}"
    base = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--nproc", "1",
            "--nnodes", "2", "--rdzv-endpoint", endpoint, "--checkpoint-every", "3", *SMALL, "--name", "mn"]
    # Node 1 starts first: c10d would make it global rank 0 (ranks follow (host, pid) order), the
    # static rendezvous keeps node 0 as rank 0. It also asks for fewer steps: the head's count wins.
    n1 = subprocess.Popen([ELMCTL, *base, "--node-rank", "1", "--max-steps", "3"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    time.sleep(1.0)
    n0 = _cli(*base, "--node-rank", "0", "--max-steps", "6")
    out1, err1 = n1.communicate(timeout=120)
    assert n0.returncode == 0, n0.stderr + n0.stdout
    assert n1.returncode == 0, out1 + err1
    assert "2 process(es)" in n0.stdout and "Traceback" not in n0.stderr + err1
    assert "max_steps: using the head node's 6 (this node had 3)" in out1
    with _store() as s:
        head, node = s.get_run("mn"), s.get_run("mn.node1")
        assert head.status == node.status == "completed" and head.step == node.step == 6
        assert head.config["nnodes"] == 2 and head.config["node_runs"] == {"1": node.id}
        assert node.config["head_run"] == head.id and node.config["max_steps"] == 6
        assert [c.step for c in s.checkpoints(head.id)] == [3, 6] and not s.checkpoints(node.id)
        assert not s.metrics(node.id, "loss")
    assert not (Path(node.run_dir) / "checkpoints").exists()
    got = _losses("mn")
    assert sorted(got) == list(range(1, 7))
    for step, loss in got.items():  # one process per node == two on one node
        assert loss == pytest.approx(refs["ddp"][step], rel=1e-6), step


def test_single_node_with_rdzv_endpoint(refs, demo, home):
    res = _cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--nproc", "2",
               "--nnodes", "1", "--rdzv-endpoint", f"127.0.0.1:{_port()}", "--max-steps", "3", *SMALL,
               "--name", "ep")
    assert res.returncode == 0, res.stderr + res.stdout
    got = _losses("ep")
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([refs["ddp"][s] for s in (1, 2, 3)], rel=1e-6)


def test_dry_run_shows_the_torchrun_command(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "h"))
    common = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--nproc", "2", "--dry-run"]
    assert main([*common, "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.5:29500",
                 "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    cmd = plan["command"]
    assert plan["world_size"] == 4 and cmd[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=10.0.0.5:29500",
                 "--nproc-per-node=2", "--max-restarts=0"):
        assert flag in cmd, flag
    assert cmd[-4:] == ["-m", "elmctl.train.worker", "pretrain", "<ELMCTL_HOME>/runs/<new run id>"]
    assert main([*common, "--nnodes", "1", "--rdzv-endpoint", "127.0.0.1:29501"]) == 0
    out = capsys.readouterr().out
    assert "--rdzv-endpoint=127.0.0.1:29501" in out and "--nnodes=1" in out
    assert main([*common, "--nnodes", "2", "--slurm"]) == 0  # sbatch: c10d, ranks from the rendezvous
    out = capsys.readouterr().out
    assert "--rdzv-backend=c10d" in out and "--node-rank" not in out
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "10.0.0.5:29500"], "--node-rank 2 is outside 0..1"),
    (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "10.0.0.5:29500"], "--node-rank -1 is outside"),
    (["--nnodes", "1", "--node-rank", "1"], "--node-rank 1 is outside 0..0"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.5"], "'10.0.0.5' is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.5:port"], "is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", ":29500"], "is not HOST:PORT"),
    (["--nnodes", "0"], "--nnodes 0: needs at least 1 node"),
    (["--nnodes", "2", "--slurm", "--rdzv-endpoint", "10.0.0.5:29500"], "--slurm picks the head node"),
])
def test_bad_node_options_are_one_line_errors(demo, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "h"))
    for extra in (["--dry-run"], []):  # the plan is checked before anything is written or launched
        code = main(["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), *args, *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.splitlines()[0].startswith("error: ") and message in err.splitlines()[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "h").exists()


def test_other_ranks_follow_the_head_checkpoint_or_say_why_not(tmp_path, monkeypatch):
    """Rank 1 on a node without the head's run folder (no shared filesystem): every rank gets the
    same clear error instead of training from step 0 against a resumed rank 0 (or hanging)."""
    from elmctl.errors import RuntimeFailure
    from elmctl.train import nodes
    from elmctl.train.dist import DistInfo

    rank1 = DistInfo(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"))
    answers = iter([[(str(tmp_path / "elsewhere" / "ckpt-6"), None, None), (None, None, None)],
                    [None, "node-b"]])
    monkeypatch.setattr(nodes.D, "gather_objects", lambda obj: next(answers))
    with pytest.raises(RuntimeFailure, match="node-b cannot read") as exc:
        nodes.agree_on_checkpoint(tmp_path, {}, rank1)
    assert "shared filesystem" in exc.value.hint
    monkeypatch.setattr(nodes.D, "gather_objects", lambda obj: [(None, "no usable checkpoint", "start anew"), obj])
    with pytest.raises(RuntimeFailure, match="the head node could not resume: no usable checkpoint"):
        nodes.agree_on_checkpoint(tmp_path, {}, rank1)
    monkeypatch.setattr(nodes.D, "gather_objects", lambda obj: [(None, None, None), obj])
    assert nodes.agree_on_checkpoint(tmp_path, {}, rank1) == (None, [])  # head starts fresh: so do we


def test_sbatch_job_resumes_when_requeued(demo, home, tmp_path):
    """`--slurm` writes a job that resumes whenever it runs: run its worker, stop it with SIGTERM
    (what Slurm sends on preemption or before the time limit), run it again: it continues."""
    r = _cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--name", "sj", "--slurm",
             "--checkpoint-every", "1000", *SMALL, "--set", "pretrain.max_iterations=400")
    assert r.returncode == 0, r.stderr
    run = _store().get_run("sj")
    script = (Path(run.run_dir) / "train.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=TERM@180" in script
    assert json.loads((Path(run.run_dir) / "options.json").read_text())["resume"] is True
    worker = [sys.executable, "-m", "elmctl.train.worker", "pretrain", run.run_dir]
    first = subprocess.Popen(worker, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # let it train a few steps, then "preempt" it
        lines.append(line)
        if line.startswith("step 5/"):
            first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130, "".join(lines)  # the worker contract: cancelled (with a checkpoint)
    stopped = _store().get_run("sj")
    assert stopped.status == "cancelled" and 5 <= stopped.step < 400
    assert not any("resumed" in x for x in lines)  # first attempt: nothing to resume, fresh start
    again = subprocess.run([*worker], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from ckpt-{stopped.step} (step {stopped.step})" in again.stdout
    done = _store().get_run("sj")
    assert done.status == "completed" and done.step == 400
