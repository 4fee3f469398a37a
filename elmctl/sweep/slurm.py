"""A sweep across a Slurm cluster: an sbatch array whose tasks are drivers of one shared study.

``elmctl tune-sweep ... --slurm --nodes N`` writes ``<home>/sweeps/<study>/sweep.sbatch``: an array
of N one-node tasks, rendered by :func:`elmctl.launch.slurm.write_sbatch`. Every task runs the same
``elmctl tune-sweep`` command (:func:`task_command`) on its node's GPUs, with the study name fixed
here, so the N drivers share one study in the database and each cell runs once (the driver claims
cells in the study, see :mod:`elmctl.sweep.study`). A requeued or resubmitted task reruns that
command, which resumes the study: finished cells are kept, its own orphaned trials are retried.

The study must live in a database server every node reaches (PostgreSQL). SQLite is refused, with no
override: the compute nodes cannot reach a file on the login node's disk, and on a shared filesystem
(NFS, Lustre) SQLite's locks are unreliable, so two drivers could both claim a cell or corrupt the
file. The store URL reaches the tasks in the environment (``ELMCTL_STORE``), not in argv, and a
script that holds a password is readable by its owner only.
"""

from __future__ import annotations

import os
from pathlib import Path

from elmctl.errors import UsageError
from elmctl.sweep.spec import SweepSpec

__all__ = ["check_shared_store", "task_command", "write_sweep_sbatch", "script_path"]

_SQLITE_WHY = ("every node's driver must reach the study's database, and SQLite is a file: the nodes cannot reach "
               "the login node's disk, and on a shared filesystem (NFS) its locks are unreliable")
_PG_HINT = 'pass --store postgresql://user@db-host/elmctl (pip install "elmctl[postgres]")'


def check_shared_store(store: str | None, storage: str | None) -> str:
    """The store URL as given (``--store`` or ``$ELMCTL_STORE``), when it and ``--storage`` are servers.

    Raises:
        UsageError: either one is SQLite (the default store, a file path, or a ``sqlite://`` URL).
    """
    given = store or os.environ.get("ELMCTL_STORE") or ""
    for label, url in (("--store", given), ("--storage", storage)):
        if label == "--storage" and not storage:
            continue
        if "://" not in url or url.startswith("sqlite"):
            what = f"{label} {url}" if url else "the default store (SQLite in $ELMCTL_HOME)"
            raise UsageError(f"--slurm needs a database server, not {what}: {_SQLITE_WHY}", hint=_PG_HINT)
    return given


def task_command(spec: SweepSpec, *, gpus_per_trial: int, parallel: int | None, storage: str | None) -> list[str]:
    """The module and arguments each array task runs: ``elmctl tune-sweep`` on its node's devices.

    Args:
        spec: the validated sweep; its base and data are absolute paths, its study name fixed.
        gpus_per_trial: GPUs per trial (GPU sweeps).
        parallel: CPU trials at a time; ``None`` for a GPU sweep (``--gpus all``: every GPU the
            node's task was given).
        storage: a separate ``--storage`` URL (``None``: the study lives in the store, whose URL
            is in the environment).
    """
    args = ["elmctl", "tune-sweep", "--recipe", spec.recipe, "--base", spec.base, "--data", spec.data,
            "--lrs", ",".join(repr(float(x)) for x in spec.lrs), "--epochs", ",".join(str(int(e)) for e in spec.epochs),
            "--loss", spec.loss, "--metric", spec.metric, "--pruner", spec.pruner,
            "--max-retries", str(spec.max_retries), "--sampler", spec.sampler]
    if spec.n_trials is not None:
        args += ["--n-trials", str(spec.n_trials)]
    for ov in spec.overrides:
        args += ["--set", ov]
    if spec.precompute_ref:
        args.append("--precompute-ref")
    if spec.epoch_eval is not None:
        ev = spec.epoch_eval
        args += ["--eval-tasks", ev.tasks, "--eval-batch-size", str(ev.batch_size)]
        args += [a for p in ev.include_path for a in ("--include-path", p)]
        if ev.limit is not None:
            args += ["--eval-limit", str(ev.limit)]
    if parallel is not None:
        args += ["--device", "cpu", "--parallel", str(parallel)]
    else:
        args += ["--gpus", "all", "--gpus-per-trial", str(gpus_per_trial)]
    if storage:
        args += ["--storage", storage]
    return [*args, "--study", spec.study]


def script_path(home: Path, study: str) -> Path:
    """Where the array script and its logs go: ``<home>/sweeps/<study>/sweep.sbatch``."""
    return home / "sweeps" / study / "sweep.sbatch"


def write_sweep_sbatch(
    spec: SweepSpec,
    *,
    store_url: str,
    home: Path,
    nodes: int,
    gpus_per_node: int,
    gpus_per_trial: int = 1,
    parallel: int | None = None,
    storage: str | None = None,
) -> Path:
    """Write the array script (see the module docstring); returns its path.

    Args:
        store_url: the store's URL as the user gave it (exported as ``ELMCTL_STORE`` in the script).
        home: ``$ELMCTL_HOME`` for the tasks (their trial run folders), on a shared filesystem.
        nodes: array tasks, one node each.
        gpus_per_node: GPUs each task asks for (0 for a CPU sweep).

    Raises:
        UsageError: a SQLite store or storage.
    """
    check_shared_store(store_url, storage)
    from sqlalchemy.engine import make_url

    from elmctl.launch.slurm import write_sbatch

    path = script_path(home, spec.study)
    has_password = any(make_url(u).password for u in (store_url, storage) if u)
    return write_sbatch(path, job_name=f"elmctl-{spec.study}", nodes=1, gpus_per_node=gpus_per_node,
                        command_args=task_command(spec, gpus_per_trial=gpus_per_trial, parallel=parallel, storage=storage),
                        run_dir=path.parent, array_tasks=nodes, private=has_password,
                        env={"ELMCTL_STORE": store_url, "ELMCTL_HOME": str(home)})
