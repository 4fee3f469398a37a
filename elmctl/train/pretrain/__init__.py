"""Pre-training (``elmctl pretrain``): one job on the shared loop.

- :mod:`elmctl.train.pretrain.launcher` - ``PretrainRequest`` -> ``prepare`` (the plan, all of
  ``--dry-run``) -> ``execute`` (store record, run folder, GPU locks, in-process or torchrun)
- :mod:`elmctl.train.pretrain.plan` - the launch plan (devices, batch split, memory, torchrun command)
- :mod:`elmctl.train.pretrain.batches` - packed token sequences in a deterministic order
- :mod:`elmctl.train.pretrain.run` - ``run_pretrain(run_dir)``: builds model, data, objective and
  optimizer from a run folder and runs the loop (in-process, or in ``elmctl.train.worker pretrain``)

Nothing here imports torch at package import; import the submodule you need.
"""
