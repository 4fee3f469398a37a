"""Pre-training batches: packed token sequences, in an order fixed by the step count.

Optimizer step s reads global sequences [s*G, (s+1)*G) of the train split (G = global batch),
sequence i being tokens [i*T, i*T + T] (T+1 tokens: inputs and shifted labels); rank r reads its
contiguous share, micro-batch by micro-batch. The data position is therefore the step count, and a
resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from elmctl.train.objectives import shift_labels

__all__ = ["PretrainBatches"]


class PretrainBatches:
    """This rank's micro-batches of packed sequences: {input_ids, labels} [micro_batch, T] (CPU)."""

    def __init__(self, dataset, *, seq_len: int, micro_batch: int, grad_accumulation: int, rank: int = 0,
                 world_size: int = 1, pad_id: int | None = None, pin: bool = False):
        self.dataset, self.seq_len, self.micro_batch = dataset, seq_len, micro_batch
        self.grad_accumulation, self.rank, self.world_size = grad_accumulation, rank, world_size
        self.pad_id, self.pin = pad_id, pin
        self.global_batch = micro_batch * grad_accumulation * world_size
        self.next_sequence = 0  # first global sequence of the current optimizer step
        self.micro = 0  # micro-batches of this step already handed out

    def sequences(self, first: int, count: int) -> torch.Tensor:
        T = self.seq_len
        span = self.dataset.read(first * T, count * T + 1)  # consecutive sequences share boundaries
        rows = np.lib.stride_tricks.sliding_window_view(span, T + 1)[::T][:count]
        return torch.from_numpy(np.ascontiguousarray(rows))

    def next_batch(self) -> dict[str, torch.Tensor]:
        per_rank = self.micro_batch * self.grad_accumulation
        first = self.next_sequence + self.rank * per_rank + self.micro * self.micro_batch
        tokens = self.sequences(first, self.micro_batch)
        if self.pin:
            tokens = tokens.pin_memory()
        self.micro += 1
        if self.micro == self.grad_accumulation:
            self.micro = 0
            self.next_sequence += self.global_batch
        ids, labels = shift_labels(tokens, self.pad_id)
        return {"input_ids": ids, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        return {"next_sequence": self.next_sequence, "micro": self.micro, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_sequence, self.micro = int(state["next_sequence"]), int(state["micro"])
