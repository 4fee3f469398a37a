"""Every matmul FLOP of a bf16 training step runs in bf16 (tensor cores on GPU).

The step is audited on the CPU under CPU autocast, which exercises the same code paths as CUDA
autocast: the model, the chunked loss (whose custom autograd function does its own dtype handling)
and backward. A dispatch mode records each GEMM/attention op with its input dtypes and FLOPs.
An fp32 GEMM on an H100 runs ~15x slower than bf16, so one stray fp32 matmul can cost a large share
of a step (the chunked loss's output-weight gradient once did).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elmctl.model.openelm import build_model
from elmctl.train.objectives import chunked_lm_loss, naive_lm_loss

aten = torch.ops.aten
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class _MatmulAudit(TorchDispatchMode):
    """Sums matmul FLOPs per input dtype; attention ops are recorded by name and dtype."""

    def __init__(self):
        super().__init__()
        self.flops: dict[torch.dtype, float] = {}
        self.attention: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            self.flops[a.dtype] = self.flops.get(a.dtype, 0.0) + 2.0 * batch * m * k * n
            assert a.dtype == b.dtype
        elif "scaled_dot_product" in func.__name__:
            self.attention.append((func.__name__, args[0].dtype))
        return func(*args, **(kwargs or {}))


def _step(loss_fn) -> _MatmulAudit:
    torch.manual_seed(0)
    model = build_model("tiny")
    ids = torch.randint(0, 259, (2, 64))
    labels = torch.randint(0, 259, (2, 64))
    audit = _MatmulAudit()
    with audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, ids, labels)
        loss.backward()
    return audit


def _chunked(model, ids, labels):
    # Small chunks so the per-chunk path runs several times.
    return chunked_lm_loss(model.hidden_states(ids), model.output_weight, labels, chunk_tokens=32)[0]


def test_every_matmul_flop_of_a_bf16_step_is_bf16():
    audit = _step(_chunked)
    total = sum(audit.flops.values())
    assert total > 0
    fp32 = audit.flops.get(torch.float32, 0.0)
    assert fp32 == 0.0, f"{fp32 / total:.1%} of matmul FLOPs ran in fp32: {audit.flops}"
    assert audit.attention and all(dt == torch.bfloat16 for _, dt in audit.attention), audit.attention


def test_chunked_loss_does_the_same_matmul_work_as_full_logits():
    # Same GEMM FLOPs as autograd through full logits (forward + both gradients), in the same dtype:
    # the chunking saves memory, not arithmetic, and adds none.
    chunked = _step(_chunked)
    naive = _step(lambda m, ids, y: sum(naive_lm_loss(m(ids), y)))
    assert chunked.flops == naive.flops


def test_bf16_output_weight_gradient_matches_fp32_closely():
    torch.manual_seed(1)
    h = torch.randn(256, 64)
    w = torch.randn(96, 64) * 0.1
    y = torch.randint(0, 96, (256,))
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        hh = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = chunked_lm_loss(hh, ww, y, chunk_tokens=64)[0]
        loss.backward()
        assert ww.grad.dtype == torch.float32  # summed over chunks in fp32, returned in w's dtype
        grads.append(ww.grad)
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert rel < 2e-2, rel
