"""Training: the core every job shares, and one subpackage per job.

The core (this package's modules):

- :mod:`elmctl.train.objectives` - chunked cross-entropy + z-loss (``lm_objective``), pure functions
- :mod:`elmctl.train.dpo` - DPO / hinge / SFT losses and preference metrics, pure functions
- :mod:`elmctl.train.schedule` - CoreNet cosine / HF warm-up schedules as ``step -> lr`` functions
- :mod:`elmctl.train.optim` - AdamW with no weight decay on 1-D parameters
- :mod:`elmctl.train.loop` - ``train(...)`` and ``make_train_step(...)`` (API in its docstring)
- :mod:`elmctl.train.dist` - process group, DDP/FSDP2/compile wrapping, state and RNG helpers
- :mod:`elmctl.train.nodes` - several nodes started by hand: follow the head node, agree on a checkpoint
- :mod:`elmctl.train.checkpoint` - atomic, verified checkpoints with retention
- :mod:`elmctl.train.metric_keys` - the metric names tune logs and sweeps rank by (no torch)
- :mod:`elmctl.train.weights` - one resolver for a model's weights (generate, export, tune --base, eval)
- :mod:`elmctl.train.run_folder` - a run's recipe and typed options (``PretrainOptions``,
  ``TuneOptions``), written and read there only; its log; how a run's end is recorded
- :mod:`elmctl.train.worker` - the one worker entry point (``pretrain | tune RUN_DIR``, ``bench``) and
  the signal / exit-code contract

The jobs: :mod:`elmctl.train.pretrain` (launcher, plan, batches, run), :mod:`elmctl.train.tune`
(launcher, inputs, batches, resume, run), :mod:`elmctl.train.tools` (bench, profile, evaluate: ``elmctl eval``). Jobs import
the core and never each other; the core imports a job only where it starts one (the worker).

Nothing here imports torch at package import; import the submodule you need.
"""
