"""Learning-rate x epoch sweeps over instruction tuning (``elmctl tune-sweep``).

- :mod:`elmctl.sweep.cells`: grid cells, ``--lrs``/``--epochs`` parsing, and the cell ledger: retry
  bookkeeping as pure functions over FrozenTrials.
- :mod:`elmctl.sweep.study`: the Optuna study in the store's database, driver liveness (orphaned
  trials), and claiming cells: the few calls that write the study.
- :mod:`elmctl.sweep.scheduler`: device slots and trial processes (one process group per trial).
- :mod:`elmctl.sweep.spec`: the sweep's settings (``SweepSpec``).
- :mod:`elmctl.sweep.driver`: the loop that claims cells, records each trial's run and run folder
  (:mod:`elmctl.train.tune.launcher`) and starts its worker on a free slot, turns per-epoch
  metrics into intermediate values, prunes, and records results. Only the driver writes the study.
- :mod:`elmctl.sweep.results`: the sweep's results as plain data (the ``--format json`` shape).
- :mod:`elmctl.sweep.resume`: trial-level resume; a retried cell continues from its earlier attempt's
  last compatible checkpoint (the driver lists candidates here; the trial's record step picks one
  with :mod:`elmctl.train.tune.resume`).

Nothing here imports torch at import time (resume's checkpoint checks load it on use); optuna and sqlalchemy are imported by the modules that need them.
"""

from __future__ import annotations

__all__ = ["cells", "study", "scheduler", "spec", "driver", "results", "resume"]
