"""Instruction tuning (``elmctl tune`` and every ``tune-sweep`` trial): DPO, hinge or SFT on the shared loop.

- :mod:`elmctl.train.tune.launcher` - ``TuneRequest`` -> ``prepare`` (the plan, all of ``--dry-run``)
  -> ``record`` (store record or a trial's claim, resume choice, run folder) -> ``execute``
  (in-process or torchrun); the sweep driver calls ``prepare``/``record`` and starts ``worker_command``
- :mod:`elmctl.train.tune.inputs` - the base weights and the preference data, resolved and checked
- :mod:`elmctl.train.tune.batches` - pair batches and collation
- :mod:`elmctl.train.tune.resume` - continuing from an earlier attempt's checkpoint (the trial side)
- :mod:`elmctl.train.tune.run` - ``run_tune(run_dir)``: the objective, the evaluation and the run
  (in-process, or in ``elmctl.train.worker tune``)

Nothing here imports torch at package import; import the submodule you need.
"""
