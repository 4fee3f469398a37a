"""Training: pure objectives and schedules, one loop (objective injected), checkpoints, torchrun worker.

- :mod:`elmctl.train.objectives` - chunked cross-entropy + z-loss (``lm_objective``), pure functions
- :mod:`elmctl.train.schedule` - CoreNet cosine / HF warm-up schedules as ``step -> lr`` functions
- :mod:`elmctl.train.optim` - AdamW with no weight decay on 1-D parameters
- :mod:`elmctl.train.loop` - ``train(...)`` and ``make_train_step(...)`` (API in its docstring)
- :mod:`elmctl.train.dist` - process group, DDP/FSDP2/compile wrapping, state and RNG helpers
- :mod:`elmctl.train.checkpoint` - atomic, verified checkpoints with retention
- :mod:`elmctl.train.plan` - the launch plan (devices, batch split, memory, torchrun command)
- :mod:`elmctl.train.pretrain` - ``run_pretrain(run_dir)``: builds everything from a run folder
- :mod:`elmctl.train.worker` - the torchrun entry point

Nothing here imports torch at package import; import the submodule you need.
"""
