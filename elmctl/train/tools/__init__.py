"""Tools on the real training step: ``elmctl bench`` and its profiler.

- :mod:`elmctl.train.tools.bench` - synthetic tokens through ``loop.make_train_step``: tokens/s, MFU,
  memory (``elmctl.train.worker bench`` for several processes)
- :mod:`elmctl.train.tools.profile` - where the step's time goes, by kernel category

Nothing here imports torch at package import; import the submodule you need.
"""
