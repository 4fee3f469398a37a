"""Autoregressive decoding with a KV cache.

Shape legend: B batch, T prompt length, N new tokens, V vocabulary (real tokens only).

Sampling only considers the real vocabulary (``config.vocab_size``): rows beyond it (the pad id and
the padding up to ``padded_vocab_size``) are never tokens a tokenizer can decode. A tokenizer with
fewer pieces than that (a tiny model trained on a small tokenizer's data) passes ``vocab_size`` so
that ids it has no piece for are never sampled either.
"""

from __future__ import annotations

import torch

from elmctl.model.openelm import KVCache, OpenELM

__all__ = ["generate"]


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # a temperature so small that the logits overflow (that is greedy), or a model emitting
        # inf/nan: softmax would give nan probabilities and multinomial would raise
        return torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
    logits = scaled
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: OpenELM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Extend ``input_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: an OpenELM (left in the train/eval mode it had).
        input_ids: LongTensor [T] or [B, T] (no padding: every row has the same prompt length).
        max_new_tokens: tokens to add.
        temperature: 0 = greedy (argmax); otherwise softmax sampling at this temperature.
        top_k: sample among the k most likely tokens only.
        eos_id: stop a row once it produced this id; finished rows are filled with it. Decoding ends
            early when every row is finished.
        generator: torch.Generator for reproducible sampling.
        vocab_size: sample only ids below this (the tokenizer's vocabulary, when it has fewer
            pieces than the model has rows); default and upper limit: ``model.config.vocab_size``.

    Returns:
        LongTensor [B, T + n] (or [T + n] for a 1-D prompt), n <= max_new_tokens.

    Raises:
        ValueError: a malformed ``input_ids``, or ``vocab_size`` outside 1..config.vocab_size.
    """
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [T] or [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    ids = ids.to(model.token_embeddings.weight.device)
    if max_new_tokens <= 0:
        return input_ids.clone()
    B, T = ids.shape
    vocab = model.config.vocab_size
    if vocab_size is not None:
        if not 1 <= vocab_size <= vocab:
            raise ValueError(f"vocab_size must lie in 1..{vocab} (the model's vocabulary), got {vocab_size}")
        vocab = vocab_size
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model, B, T + max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out = [ids]
        step_input = ids  # prefill with the whole prompt, then one token per step
        for _ in range(max_new_tokens):
            h = model.hidden_states(step_input, cache)[:, -1]  # [B, D]: only the last position's logits
            logits = torch.nn.functional.linear(h, model.output_weight[:vocab]).float()  # [B, V]
            token = _next_token(logits, temperature, top_k, generator)  # [B]
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done = done | (token == eos_id)
            out.append(token[:, None])
            step_input = token[:, None]
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result
