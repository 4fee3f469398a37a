"""GPU discovery/selection, GPU locks, torchrun commands, sbatch scripts, supervision."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.launch import gpus, locks, slurm, supervise, torchrun

SMI_OUTPUT = """\
0, NVIDIA H100 80GB HBM3, 81559, GPU-aaaa0000-1111
1, NVIDIA H100 80GB HBM3, 81559, GPU-bbbb0000-2222
2, NVIDIA H100 80GB HBM3, 81559, GPU-cccc0000-3333
3, NVIDIA H100 80GB HBM3, 81559, GPU-dddd0000-4444
"""


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "smi.txt").write_text(SMI_OUTPUT)
    _script(bindir / "nvidia-smi", f'echo "$@" > {tmp_path}/smi.args\ncat {tmp_path}/smi.txt\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


# -- discovery ------------------------------------------------------------------------------------
def test_discover_parses_nvidia_smi(fake_smi):
    found = gpus.discover()
    assert [g.index for g in found] == [0, 1, 2, 3]
    assert found[0].name == "NVIDIA H100 80GB HBM3" and found[3].uuid == "GPU-dddd0000-4444"
    assert found[0].memory_gib == pytest.approx(79.65, abs=0.01)
    args = (fake_smi / "smi.args").read_text()
    assert "--query-gpu=index,name,memory.total,uuid" in args and "--format=csv,noheader,nounits" in args


@pytest.mark.parametrize(
    "visible, expected",
    [("2,0", [2, 0]), ("GPU-bbbb", [1]), ("3,9,1", [3]), ("", []), ("-1", [])],
)
def test_discover_respects_cuda_visible_devices(fake_smi, monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in gpus.discover()] == expected


def test_discover_without_nvidia_smi_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus.discover() == []


def test_failing_nvidia_smi_is_runtime_failure(tmp_path, monkeypatch):
    _script(tmp_path / "nvidia-smi", 'echo "NVIDIA-SMI has failed because it could not communicate" >&2\nexit 9\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(RuntimeFailure, match="could not communicate"):
        gpus.discover()


# -- selection ------------------------------------------------------------------------------------
FOUR = [gpus.GpuInfo(i, "NVIDIA H100", 80.0, f"GPU-{i}") for i in range(4)]


def test_select_counts_lists_and_all():
    assert gpus.select(None, FOUR) == [0, 1, 2, 3]
    assert gpus.select("all", FOUR) == [0, 1, 2, 3]
    assert gpus.select(2, FOUR) == [0, 1]
    assert gpus.select("2", FOUR, busy={0}) == [1, 2]  # a count prefers free GPUs
    assert gpus.select("0,3", FOUR) == [0, 3]
    assert gpus.select("3,", FOUR) == [3]
    assert gpus.select(None, [], device="cpu") == []


def test_select_more_than_there_are_lists_them():
    with pytest.raises(UsageError) as err:
        gpus.select("8", FOUR)
    assert "--gpus 8" in err.value.message and "this machine has 4 GPUs: 0 (NVIDIA H100, 80 GiB)" in err.value.message
    assert "--gpus 4" in err.value.hint


@pytest.mark.parametrize("arg", ["0,7", "x", "0", "1,1"])
def test_select_bad_values(arg):
    with pytest.raises(UsageError):
        gpus.select(arg, FOUR)


def test_select_no_gpu_points_to_cpu():
    with pytest.raises(UsageError, match="no GPU found; use --device cpu to train on the CPU"):
        gpus.select(None, [])
    with pytest.raises(UsageError, match="conflicts with --device cpu"):
        gpus.select(2, FOUR, device="cpu")


# -- locks ----------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from elmctl.launch import locks
    lease = locks.acquire([int(x) for x in sys.argv[1].split(",")], sys.argv[2])
    print("ready", flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


@pytest.fixture
def lock_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def _hold(indices: str, run_id: str, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, indices, run_id, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_acquirer_sees_holder(lock_env):
    holder = _hold("1,2", "ab12cd34", 30)
    try:
        with pytest.raises(locks.GpuBusyError) as err:
            locks.acquire([2, 3], "ffff0000")
        msg = str(err.value)
        assert f"GPU 2 is busy: run ab12cd34 (pid {holder.pid}) since " in msg
        assert "use --wait to queue, or pick other GPUs with --gpus" in msg
        assert set(err.value.holders) == {2}
        assert set(locks.holders()) == {1, 2}
        with locks.acquire([3], "ffff0000") as lease:  # the failed attempt left GPU 3 free
            assert lease.indices == [3]
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_dead_process_is_taken_over(lock_env):
    holder = _hold("0", "deadbeef", 30)
    holder.kill()
    holder.wait()
    assert '"deadbeef"' in (lock_env / "gpu-0.lock").read_text()  # body still names the dead run
    assert locks.holders() == {}
    with locks.acquire([0], "c0ffee00"):
        assert locks.holders()[0].run_id == "c0ffee00"
    assert locks.holders() == {}


def test_wait_mode_blocks_until_free(lock_env):
    holder = _hold("0,1", "ab12cd34", 1.0)
    waited = []
    t0 = time.monotonic()
    with locks.acquire([1], "c0ffee00", wait=True, poll=0.05, on_wait=waited.append):
        assert time.monotonic() - t0 > 0.3
    assert len(waited) == 1 and waited[0][1].run_id == "ab12cd34"
    holder.wait()


def test_wait_timeout_and_in_process_conflict(lock_env):
    with locks.acquire([5], "aaaa0000"):
        with pytest.raises(locks.GpuBusyError, match="run aaaa0000"):
            locks.acquire([5], "bbbb0000", wait=True, poll=0.05, timeout=0.2)


def test_lock_follows_the_training_process_via_pass_fds(lock_env):
    lease = locks.acquire([4], "ab12cd34")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=lease.fds)
    try:
        lease.release()  # elmctl's own copy is gone, the trainer still holds the GPU
        with pytest.raises(locks.GpuBusyError):
            locks.acquire([4], "ffff0000")
    finally:
        child.kill()
        child.wait()
    locks.acquire([4], "ffff0000").release()


# -- torchrun -------------------------------------------------------------------------------------
def test_build_command_single_node():
    cmd = torchrun.build_command(8, ["elmctl.train.worker", "tune", "runs/ab12"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=8" in cmd and "--nnodes=1" in cmd
    assert cmd[-4:] == ["-m", "elmctl.train.worker", "tune", "runs/ab12"]
    fixed = torchrun.build_command(2, ["m"], master_port=29123)
    assert "--master-port=29123" in fixed and "--master-addr=127.0.0.1" in fixed and "--standalone" not in fixed


def test_build_command_multi_node():
    cmd = torchrun.build_command(4, ["m"], nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29500", rdzv_id="job7")
    for flag in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29500", "--rdzv-id=job7"):
        assert flag in cmd
    assert "--standalone" not in cmd
    with pytest.raises(ValueError):
        torchrun.build_command(4, ["m"], nnodes=2)
    with pytest.raises(ValueError):
        torchrun.build_command(0, ["m"])


def test_build_env_and_free_port():
    env = torchrun.build_env([0, 3], nproc=2, base={"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PYTHONUNBUFFERED"] == "1"
    cpu = torchrun.build_env([], base={"OMP_NUM_THREADS": "3"}, extra={"ELMCTL_STORE": "sqlite://"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "3" and cpu["ELMCTL_STORE"] == "sqlite://"
    assert torchrun.build_env(None, threads=2)["OMP_NUM_THREADS"] == "2"
    port = torchrun.free_port()
    assert 1024 < port < 65536


def test_torchrun_command_really_launches_two_processes(tmp_path):
    (tmp_path / "hello_dist.py").write_text('import os\nprint(f"rank {os.environ[\'RANK\']} of {os.environ[\'WORLD_SIZE\']}")\n')
    env = torchrun.build_env([], nproc=2, extra={"PYTHONPATH": str(tmp_path)})
    code = supervise.run_supervised(torchrun.build_command(2, ["hello_dist"]), env, tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text()
    assert code == 0, log
    assert "rank 0 of 2" in log and "rank 1 of 2" in log


# -- slurm ----------------------------------------------------------------------------------------
def test_sbatch_script_text_and_syntax(tmp_path):
    path = slurm.write_sbatch(
        tmp_path / "job.sbatch", job_name="elm 1_1b", nodes=2, gpus_per_node=8,
        command_args=["elmctl.train.worker", "pretrain", "runs/ab12cd34"], run_dir=tmp_path / "run",
        time="24:00:00", partition="gpu",
    )
    text = path.read_text()
    assert os.access(path, os.X_OK)
    for needle in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --time=24:00:00",
                   "#SBATCH --partition=gpu", "#SBATCH --job-name=elm-1_1b", 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p',
                   "srun ", "--rdzv-backend=c10d", '--rdzv-endpoint="$head_addr:$rdzv_port"', "--nproc-per-node=8",
                   "--nnodes=2", "-m elmctl.train.worker pretrain runs/ab12cd34"):
        assert needle in text, needle
    assert "--node-rank" not in text  # c10d assigns ranks; every node runs the same line
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_sbatch_script_runs_with_fake_slurm(tmp_path):
    """Run the script under fake scontrol/getent/srun: the head address must not be loopback."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # Many hosts: a reader that stops early (head -n1) would SIGPIPE scontrol and, under
    # pipefail, kill the job script.
    _script(bindir / "scontrol", "echo node-a\nfor i in $(seq 1 20000); do echo node-$i; done\n")
    _script(bindir / "getent", 'echo "127.0.1.1  node-a"\necho "10.1.2.3  node-a"\n')
    _script(bindir / "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    path = slurm.write_sbatch(tmp_path / "job.sh", job_name="j", nodes=2, gpus_per_node=4,
                              command_args=["m"], run_dir=tmp_path / "run")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2"}
    subprocess.run(["bash", str(path)], check=True, env=env, capture_output=True)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--rdzv-endpoint=10.1.2.3:29500" in args and "--rdzv-id=4242" in args
    assert (tmp_path / "run").is_dir()


# -- supervise ------------------------------------------------------------------------------------
TRAPPER = textwrap.dedent(
    """
    import signal, sys, time
    def bye(signum, frame):
        print(f"got {signal.Signals(signum).name}", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    print("ready", flush=True)
    time.sleep(30)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_as_sigterm(tmp_path, sig):
    ready = threading.Event()
    lines: list[str] = []
    told: list[int] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "ready":
            ready.set()

    def poke() -> None:
        ready.wait(10)
        os.kill(os.getpid(), sig)

    threading.Thread(target=poke, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    code = supervise.run_supervised([sys.executable, "-c", TRAPPER], None, tmp_path / "train.log",
                                    on_line=on_line, on_signal=told.append)
    assert code == 3
    assert lines == ["ready", "got SIGTERM"]  # Ctrl-C reaches the child as SIGTERM
    assert (tmp_path / "train.log").read_text() == "ready\ngot SIGTERM\n"
    assert told == [sig] and signal.getsignal(signal.SIGTERM) is before


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path):
    child = supervise.start_supervised(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(30)"],
        None, tmp_path / "log")
    time.sleep(0.5)
    t0 = time.monotonic()
    child.terminate(grace_s=0.5)
    assert child.wait(10) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_leftover_workers_are_killed_with_their_launcher(tmp_path):
    code = supervise.run_supervised(
        [sys.executable, "-c", "import subprocess; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"],
        None, tmp_path / "log")
    assert code == 0
    orphan = int((tmp_path / "log").read_text().split()[0])
    deadline = time.monotonic() + 5
    while supervise.pid_alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not supervise.pid_alive(orphan)


def test_pid_alive_and_signal_run():
    assert supervise.pid_alive(os.getpid())
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert supervise.pid_alive(p.pid)
    assert supervise.signal_run(p.pid)
    p.wait()
    assert not supervise.pid_alive(p.pid) and not supervise.signal_run(p.pid)
    z = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited, not yet reaped: a zombie is not alive
    assert not supervise.pid_alive(z.pid)
    z.wait()


def test_missing_executable_is_runtime_failure(tmp_path):
    with pytest.raises(RuntimeFailure, match="cannot start /nonexistent/python"):
        supervise.run_supervised(["/nonexistent/python"], None, tmp_path / "log")


def test_sbatch_array_script_and_submit(tmp_path, monkeypatch):
    """An array of one-node tasks: each runs the command once as one srun step, no torchrun."""
    path = slurm.write_sbatch(tmp_path / "a.sbatch", job_name="s", nodes=1, gpus_per_node=0, command_args=["m", "--x"],
                              run_dir=tmp_path / "r", array_tasks=5, env={"ELMCTL_STORE": "postgresql://u:pw@db/e"},
                              private=True)
    text = path.read_text()
    assert "#SBATCH --array=0-4" in text and "--gpus-per-node" not in text and "torch.distributed" not in text
    assert f"{sys.executable} -m m --x" in text and os.stat(path).st_mode & 0o077 == 0
    subprocess.run(["bash", "-n", str(path)], check=True)
    with pytest.raises(ValueError):
        slurm.render_sbatch(job_name="s", nodes=2, gpus_per_node=1, command_args=["m"], run_dir=tmp_path, array_tasks=2)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="sbatch not found"):
        slurm.submit(path)
