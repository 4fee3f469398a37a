"""The metric keys a DPO tune run writes to the store, for the code that reads them back (sweep, report).

No torch here: the sweep driver and the reports import these without loading the trainer.
"""

from __future__ import annotations

__all__ = ["EVAL_KEYS", "METRIC_DIRECTIONS"]

#: what :func:`elmctl.train.tune.run.run_tune` logs at the end of each epoch (with ``epoch``), in this order;
#: the training steps log ``train_<key>``. preference_accuracy: the tuned model alone ranks chosen above
#: rejected (log p); base_...: the frozen base does (the same number every epoch: where the tuning started).
EVAL_KEYS = ("eval_loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
             "preference_accuracy", "base_preference_accuracy")

#: the eval metrics a sweep can rank trials by, with their direction (the final epoch's value is the trial's)
METRIC_DIRECTIONS = {"eval_loss": "minimize", "reward_accuracy": "maximize", "reward_margin": "maximize"}
