"""AdamW with CoreNet's weight-decay filter: no decay on 1-D parameters (norm weights, biases)."""

from __future__ import annotations

import torch

__all__ = ["param_groups", "build_adamw", "set_lr"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: >= 2-D weights (decayed) and 1-D/0-D ones (not decayed).

    CoreNet ``modeling/misc/common.py`` excludes norm and bias parameters; in OpenELM those are
    exactly the 1-D ones. Tied parameters appear once (``named_parameters`` de-duplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels on CUDA (one launch for all parameters)."""
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=bool(fused) or None
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
