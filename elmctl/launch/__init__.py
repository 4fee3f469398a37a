"""Local launch machinery: GPU discovery and locking, torchrun commands, supervision, Slurm.

Modules (import the one you need; none imports torch):
- ``gpus``: ``discover()`` via nvidia-smi, ``select(--gpus, available, device=...)``.
- ``locks``: ``acquire(indices, run_id, wait=...)`` machine-wide per-GPU locks with holder info.
- ``torchrun``: ``free_port()``, ``build_command(nproc, module_args, ...)``, ``build_env(gpus, ...)``.
- ``supervise``: ``run_supervised(cmd, env, log_path, ...)``, ``start_supervised``, ``pid_alive``,
  ``signal_run``: own process group, tee'd log, SIGTERM then SIGKILL.
- ``slurm``: ``write_sbatch(path, ...)`` multi-node script with c10d rendezvous and requeue.

A local launch, in order::

    gpus = select(args.gpus, discover(), device=args.device, busy=holders())
    with acquire(gpus, run.id, wait=args.wait, on_wait=lambda h: store.set_status(run.id, "queued")) as lease:
        cmd = build_command(len(gpus), ["elmctl.train.worker", "pretrain", run.run_dir])
        code = run_supervised(cmd, build_env(gpus, nproc=len(gpus)), log, pass_fds=lease.fds)
"""

from __future__ import annotations
