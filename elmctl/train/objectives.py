"""Training objectives: pure functions of (model, batch) -> (loss, metrics).

The language-model loss never materialises fp32 logits for the whole batch: hidden states are
multiplied by the (tied) output weight one chunk of tokens at a time, and the gradient of each chunk
is computed right there (a custom autograd function, as in Liger's fused linear cross-entropy), so
the peak extra memory is one chunk's logits (chunk_tokens x V) instead of B*T x V.

Loss (CoreNet ``cross_entropy.py``, openelm-facts.md §1), over the N positions whose label is not
ignored (label == ignore_index or label == pad):

    ce     = (1/N) * sum_i [ lse_i - z_i[y_i] ]                  lse_i = logsumexp_v z_i[v]
    z_loss = (coef/N) * sum_i lse_i^2                             (CoreNet coef 1e-4)
    loss   = ce + z_loss

d loss / d z_i = (softmax(z_i) * (1 + 2 coef lse_i) - onehot(y_i)) / N, for kept positions.

Shape legend: B batch, T sequence, D model width, V padded vocabulary, C tokens in a chunk.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from elmctl.data import IGNORE_INDEX

__all__ = ["chunked_lm_loss", "naive_lm_loss", "lm_objective", "shift_labels"]

DEFAULT_CHUNK_TOKENS = 4096

Objective = Callable[[Any, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The autocast dtype (bf16) when autocast is on for t's device, else t's own dtype.

    Matmuls run in this dtype; softmax, logsumexp and the z-loss are always fp32.
    """
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _chunk_forward(h_CD: torch.Tensor, w_VD: torch.Tensor, y_C: torch.Tensor, z_coef: float, need_grad: bool):
    """One chunk: sums of (ce, lse^2) over kept positions and, if asked, the unnormalised grads."""
    acc = torch.promote_types(h_CD.dtype, torch.float32)  # fp32 math for bf16 inputs, fp64 stays fp64
    logits_CV = (h_CD @ w_VD.t()).to(acc)
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    keep_C = y_C >= 0
    safe_y_C = torch.where(keep_C, y_C, torch.zeros_like(y_C))
    target_C = logits_CV.gather(1, safe_y_C[:, None]).squeeze(1)
    keep_f = keep_C.to(acc)
    ce_sum = ((lse_C - target_C) * keep_f).sum()
    z_sum = (lse_C.square() * keep_f).sum()
    if not need_grad:
        return ce_sum, z_sum, None, None
    # d/dlogits of [ce + coef*lse^2] per position, zero where ignored. Written as one elementwise
    # expression of (logits, lse, y) -- softmax as exp(z - lse), the one-hot as a comparison -- so
    # the compiled chunk is one fused pass over the C x V logits (a scatter would need the fp32
    # probabilities materialised and re-read).
    scale_C = (1.0 + 2.0 * z_coef * lse_C) * keep_f
    probs_CV = torch.exp(logits_CV - lse_C[:, None]) * scale_C[:, None]
    onehot_CV = torch.arange(logits_CV.shape[1], device=y_C.device)[None, :] == safe_y_C[:, None]
    dlogits_CV = torch.where(onehot_CV, probs_CV - keep_f[:, None], probs_CV).to(h_CD.dtype)
    grad_h_CD = dlogits_CV @ w_VD
    # In the compute dtype like the other two matmuls (bf16 tensor cores on GPU, fp32 accumulation
    # inside the GEMM); the caller sums the chunks in fp32. As an fp32 GEMM this was 2*B*T*V*D
    # FLOPs at non-tensor-core speed: by estimate ~40 ms of a 160 ms 270M step on an H100.
    grad_w_VD = dlogits_CV.t() @ h_CD
    return ce_sum, z_sum, grad_h_CD, grad_w_VD


_compiled_chunk: Callable | None = None


def _chunk_fn(device: torch.device) -> Callable:
    # On CUDA the chunk is a compiled function (fuses the softmax/z-loss/grad elementwise work);
    # on CPU plain eager is faster to start and the chunks are small.
    global _compiled_chunk
    if device.type != "cuda":
        return _chunk_forward
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_forward, dynamic=False)
    return _compiled_chunk


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, z_coef: float, chunk_tokens: int, use_compile: bool, need_grad: bool):
        dtype = _compute_dtype(h_ND)
        fn = _chunk_fn(h_ND.device) if use_compile else _chunk_forward
        with torch.autocast(h_ND.device.type, enabled=False):
            h = h_ND.to(dtype)
            w = w_VD.to(dtype)
            n_tok = h.shape[0]
            acc = torch.promote_types(dtype, torch.float32)
            count = (y_N >= 0).sum().clamp(min=1).to(acc)
            ce = torch.zeros((), device=h.device, dtype=acc)
            zs = torch.zeros((), device=h.device, dtype=acc)
            grad_h = torch.empty_like(h) if need_grad else None
            grad_w = torch.zeros(w.shape, device=w.device, dtype=acc) if need_grad else None
            for s in range(0, n_tok, chunk_tokens):
                e = min(s + chunk_tokens, n_tok)
                c, z, gh, gw = fn(h[s:e], w, y_N[s:e], z_coef, need_grad)
                ce = ce + c
                zs = zs + z
                if need_grad:
                    grad_h[s:e] = gh
                    grad_w += gw
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, count)
            ctx.in_dtypes = (h_ND.dtype, w_VD.dtype)
        ce = ce / count
        zs = zs * z_coef / count
        # Only the total is differentiable: the per-chunk grads above are of (ce + z_loss).
        ce_out, z_out = ce.detach(), zs.detach()
        ctx.mark_non_differentiable(ce_out, z_out)
        return ce + zs, ce_out, z_out

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_z):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = g_loss / count
        return (
            (grad_h.to(scale.dtype) * scale).to(ctx.in_dtypes[0]),
            (grad_w * scale).to(ctx.in_dtypes[1]),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_lm_loss(
    hidden_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    z_loss_coef: float = 1e-4,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compile_chunks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy and z-loss of ``hidden @ weight.T`` against ``labels``, chunked over tokens.

    Args:
        hidden_BTD: final hidden states (after the last norm).
        weight_VD: output projection (OpenELM: the tied embedding), V = padded vocabulary.
        labels_BT: target token per position; negative values are ignored.
        z_loss_coef: weight of the squared logsumexp term (0 disables it).
        chunk_tokens: tokens per chunk; peak extra memory is chunk_tokens x V fp32.
        compile_chunks: compile the per-chunk function on CUDA.

    Returns:
        (loss, ce, z_loss): scalars averaged over kept positions; loss = ce + z_loss is the
        differentiable one, ce and z_loss are detached values for logging.
    """
    D = hidden_BTD.shape[-1]
    # Inside Function.forward grad mode is always off, so decide here whether grads are wanted
    # (evaluation under no_grad skips the gradient work entirely).
    need_grad = torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad)
    return _ChunkedLMLoss.apply(
        hidden_BTD.reshape(-1, D), weight_VD, labels_BT.reshape(-1), float(z_loss_coef), int(chunk_tokens),
        compile_chunks, need_grad,
    )


def naive_lm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *, z_loss_coef: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation on full logits (tests, and objectives that need the logits)."""
    acc = torch.promote_types(logits_BTV.dtype, torch.float32)
    logits = logits_BTV.to(acc).reshape(-1, logits_BTV.shape[-1])
    y = labels_BT.reshape(-1)
    keep = y >= 0
    count = keep.sum().clamp(min=1)
    ce = torch.nn.functional.cross_entropy(logits, torch.where(keep, y, 0), reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    return (ce * keep).sum() / count, z_loss_coef * (lse.square() * keep).sum() / count


def shift_labels(tokens_BT1: torch.Tensor, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed tokens [B, T+1] -> (input_ids [B, T], labels [B, T]) with pad targets ignored."""
    ids = tokens_BT1[:, :-1]
    labels = tokens_BT1[:, 1:]
    if pad_id is not None:
        labels = labels.masked_fill(labels == pad_id, IGNORE_INDEX)
    return ids, labels


def lm_objective(*, z_loss_coef: float = 1e-4, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Objective:
    """Next-token objective for pre-training (and SFT): batch = {input_ids, labels} [B, T].

    Returns ``objective(model, batch) -> (loss, {"ce": ..., "z_loss": ...})`` where ``model`` offers
    ``hidden_states(ids)`` and ``output_weight`` (see :class:`elmctl.train.dist.ModelHandle`).
    """

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = model.hidden_states(batch["input_ids"])
        loss, ce, z = chunked_lm_loss(
            hidden, model.output_weight, batch["labels"], z_loss_coef=z_loss_coef, chunk_tokens=chunk_tokens
        )
        return loss, {"ce": ce, "z_loss": z}

    return objective
