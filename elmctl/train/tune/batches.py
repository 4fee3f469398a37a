"""A tune run's batches: the preference-pair batch source (the plan is :func:`elmctl.config.plan.tune_plan`).

Part of the tune job (:mod:`elmctl.train.tune`). The recipe's effective batch (per_device_batch x
grad_accumulation x num_gpus) is kept on any number of processes (:func:`elmctl.config.plan.tune_plan`);
:class:`PairBatches` hands each rank its micro-batches, epoch by epoch over a seeded permutation,
and :func:`collate` turns pair indices into tensors (pair rows, or chosen-only rows for SFT).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from elmctl.errors import UsageError

__all__ = ["PairBatches", "collate"]


class PairBatches:
    """This rank's micro-batches of preference pairs (the loop's BatchSource).

    Step s of epoch e uses pairs perm_e[s*G:(s+1)*G] (G the global batch); rank r takes its
    contiguous share, micro-batch by micro-batch. ``ref`` (optional) holds precomputed reference
    log-probs per pair index: float tensors ``chosen``/``rejected``.
    """

    def __init__(self, pairs, *, micro_batch: int, grad_accumulation: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, sft: bool = False, ref: dict | None = None):
        self.pairs, self.micro, self.accum, self.pad_id, self.seed = pairs, micro_batch, grad_accumulation, pad_id, seed
        self.rank, self.world, self.sft, self.ref = rank, world_size, sft, ref
        self.global_batch = micro_batch * grad_accumulation * world_size
        self.steps_per_epoch = len(pairs) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UsageError(f"{len(pairs)} training pairs are fewer than one effective batch of {self.global_batch}",
                             "prepare more pairs, or lower instruct.per_device_batch/grad_accumulation with --set")
        self.step = 0  # optimizer steps handed out
        self.k = 0  # micro-batches of the current step handed out

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def next_batch(self) -> dict[str, torch.Tensor]:
        epoch, s = divmod(self.step, self.steps_per_epoch)
        perm = self._perm(epoch)
        first = s * self.global_batch + self.rank * self.micro * self.accum + self.k * self.micro
        idx = perm[first : first + self.micro]
        self.k += 1
        if self.k == self.accum:
            self.step, self.k = self.step + 1, 0
        return collate(self.pairs, idx, self.pad_id, sft=self.sft, ref=self.ref)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.k = int(state["step"]), int(state["k"])


def collate(pairs, idx, pad_id: int, *, sft: bool = False, ref: dict | None = None, eval_mode: bool = False) -> dict:
    """Pairs ``idx`` -> a batch (collate_pairs rows, or collate_sft rows when training SFT)."""
    from elmctl.data.preference import collate_pairs, collate_sft

    chosen = [pairs[int(i)] for i in idx]
    batch = collate_sft(chosen, pad_id) if (sft and not eval_mode) else collate_pairs(chosen, pad_id)
    if ref is not None and not (sft and not eval_mode):
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        batch["ref_chosen"], batch["ref_rejected"] = ref["chosen"][t], ref["rejected"][t]
    if eval_mode:
        batch["_eval"] = True
    return batch
