"""Numbers derived from a recipe: per-layer shapes, parameters, FLOPs, memory, batch plan.

Pure Python (no numpy, no torch) so `elmctl recipe show` starts fast. The layer-wise scaling
reproduces CoreNet's ``GPTConfig.__post_init__`` exactly, including numpy's linspace and the
2-decimal rounding (numpy rounds x*100 half-to-even; Python's ``round`` on a float does the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.config.schema import ModelConfig, Recipe

__all__ = [
    "GIB",
    "GPU_PEAK_BF16_FLOPS",
    "LayerShape",
    "ParamCount",
    "linspace",
    "make_divisible",
    "layer_shapes",
    "param_count",
    "flops_per_token",
    "memory_estimate",
    "derive",
]

GIB = 1024**3

# Dense bf16 tensor-core peak (no sparsity), FLOP/s. MFU is measured against these.
GPU_PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


@dataclass(frozen=True)
class LayerShape:
    index: int
    qkv_multiplier: float
    ffn_multiplier: float
    query_heads: int
    kv_heads: int
    ffn_dim: int


@dataclass(frozen=True)
class ParamCount:
    vocab_size: int
    embedding: int
    attention: int
    ffn: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.ffn + self.norms

    @property
    def matmul(self) -> int:
        """Weights that take part in matrix products (the tied head counted once)."""
        return self.embedding + self.attention + self.ffn


def linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace(start, stop, num) with both endpoints, value for value."""
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    values = [start + i * step for i in range(num)]
    values[-1] = float(stop)
    return values


def _round2(x: float) -> float:
    # numpy.round(x, 2): rint(x * 100) / 100, half to even.
    return round(x * 100) / 100


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """CoreNet ``make_divisible``: nearest multiple of divisor, at least divisor, never < 0.9 v."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


@lru_cache(maxsize=64)
def _layer_shapes(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    num_gqa_groups: int,
    qkv_multipliers: tuple[float, float],
    ffn_multipliers: tuple[float, float],
    ffn_dim_divisor: int,
) -> tuple[LayerShape, ...]:
    alphas = [_round2(a) for a in linspace(*qkv_multipliers, num_layers)]
    betas = [_round2(b) for b in linspace(*ffn_multipliers, num_layers)]
    shapes = []
    for i, (alpha, beta) in enumerate(zip(alphas, betas)):
        q_dim = make_divisible(model_dim * alpha, head_dim * num_gqa_groups)
        query_heads = q_dim // head_dim
        ffn_dim = make_divisible(beta * model_dim, ffn_dim_divisor)
        shapes.append(LayerShape(i, alpha, beta, query_heads, query_heads // num_gqa_groups, ffn_dim))
    return tuple(shapes)


def layer_shapes(model: "ModelConfig") -> tuple[LayerShape, ...]:
    """Per-layer query heads, KV heads and FFN width after layer-wise scaling."""
    return _layer_shapes(
        model.num_layers,
        model.model_dim,
        model.head_dim,
        model.num_gqa_groups,
        tuple(model.qkv_multipliers),
        tuple(model.ffn_multipliers),
        model.ffn_dim_divisor,
    )


def param_count(model: "ModelConfig", vocab_size: int | None = None) -> ParamCount:
    """Exact parameter count; ``vocab_size`` defaults to the HF (released) vocabulary."""
    vocab = model.vocab_size if vocab_size is None else vocab_size
    d, dh = model.model_dim, model.head_dim
    attention = ffn = 0
    norms = d  # final norm
    for layer in layer_shapes(model):
        attention += d * (layer.query_heads + 2 * layer.kv_heads) * dh + layer.query_heads * dh * d
        ffn += 3 * d * layer.ffn_dim
        norms += 2 * d + (2 * dh if model.normalize_qk_projections else 0)
    embedding = vocab * d * (1 if model.share_input_output_layers else 2)
    return ParamCount(vocab, embedding, attention, ffn, norms)


def flops_per_token(model: "ModelConfig", seq_len: int | None = None, vocab_size: int | None = None) -> float:
    """Training FLOPs per token: 6 N (matmul weights) + sum over layers of 12 n_q d_h T (PaLM B)."""
    T = model.context_length if seq_len is None else seq_len
    vocab = model.padded_vocab_size if vocab_size is None else vocab_size
    n = param_count(model, vocab).matmul
    attn = sum(12 * layer.query_heads * model.head_dim * T for layer in layer_shapes(model))
    return 6.0 * n + attn


def _activation_bytes_per_token(model: "ModelConfig", checkpointing: bool) -> float:
    # perf-anchors.md: per token per layer (flash attention, bf16, no dropout)
    # 8h + 6f + 6(n_q + n_kv) d_h + 4 n_q bytes; full checkpointing keeps ~2h per layer
    # plus one layer's full activations while it is recomputed.
    # + 2h: the residual stream is fp32 under autocast (the embedding's output is), so the saved norm
    # inputs are wider than the formula's bf16. Calibrated on H100 max_memory_allocated (16 x 2048,
    # no checkpointing): the estimate is within 2% of 270M's 25.4 GiB and 1.1B's 71.3 GiB (it was
    # 5-7% low without this term); tests/unit/test_derived.py keeps it there.
    h, dh = model.model_dim, model.head_dim
    per_layer = [
        10 * h + 6 * s.ffn_dim + 6 * (s.query_heads + s.kv_heads) * dh + 4 * s.query_heads
        for s in layer_shapes(model)
    ]
    if checkpointing:
        return 2 * h * model.num_layers + max(per_layer)
    return float(sum(per_layer))


def memory_estimate(
    model: "ModelConfig",
    micro_batch: int,
    seq_len: int | None = None,
    *,
    checkpointing: bool = False,
    fsdp_shards: int = 1,
    chunked_logits: bool = True,
) -> dict[str, float]:
    """Peak training memory per GPU in bytes (AdamW, bf16 autocast, fp32 master weights)."""
    T = model.context_length if seq_len is None else seq_len
    n = param_count(model, model.padded_vocab_size).total
    states = 16.0 * n / fsdp_shards  # weights + grads + 2 Adam moments (fp32) + bf16 copies
    tokens = micro_batch * T
    activations = tokens * _activation_bytes_per_token(model, checkpointing)
    # Unchunked: bf16 logits + fp32 upcast + fp32 grad = ~10 V bytes per token.
    # Chunked (elmctl's trainer): the same for one chunk of 4096 tokens at a time.
    logits = 10.0 * model.padded_vocab_size * (min(tokens, 4096) if chunked_logits else tokens)
    workspace = 1.5 * GIB  # CUDA context, cuBLAS/flash workspaces, allocator slack
    total = states + activations + logits + workspace
    return {
        "states": states,
        "activations": activations,
        "logits": logits,
        "workspace": workspace,
        "total": total,
    }


def derive(
    recipe: "Recipe",
    *,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All derived numbers of a recipe as plain data (the `derived` key of `recipe show --format json`).

    ``plan``: a :func:`elmctl.config.plan.batch_plan` to show under ``plan`` (``recipe show --gpus``).
    """
    model, pt = recipe.model, recipe.pretrain
    hf = param_count(model)
    train = param_count(model, model.padded_vocab_size)
    T = model.context_length
    tokens_per_step = pt.sequences_per_gpu * pt.num_gpus * T
    fpt = flops_per_token(model)
    total_tokens = tokens_per_step * pt.max_iterations
    mem = memory_estimate(
        model,
        pt.sequences_per_gpu,
        checkpointing=pt.activation_checkpointing,
        fsdp_shards=pt.num_gpus if pt.fsdp else 1,
    )
    mem_no_ckpt = memory_estimate(model, pt.sequences_per_gpu, checkpointing=False)
    mem_unchunked = memory_estimate(
        model, pt.sequences_per_gpu, checkpointing=pt.activation_checkpointing, chunked_logits=False,
        fsdp_shards=pt.num_gpus if pt.fsdp else 1,
    )
    out: dict[str, Any] = {
        "params_total": hf.total,
        "params": {"hf_vocab": _params_dict(hf), "training_vocab": _params_dict(train)},
        "layers": [asdict(s) for s in layer_shapes(model)],
        "flops_per_token": fpt,
        "flops_per_token_attention": fpt - 6.0 * train.matmul,
        "tokens_per_step": tokens_per_step,
        "global_batch_sequences": pt.sequences_per_gpu * pt.num_gpus,
        "pretrain_tokens": total_tokens,
        "pretrain_flops": fpt * total_tokens,
        "memory_per_gpu_gib": {
            "states": mem["states"] / GIB,
            "activations": mem["activations"] / GIB,
            "activations_without_checkpointing": mem_no_ckpt["activations"] / GIB,
            "logits_chunked": mem["logits"] / GIB,
            "logits_unchunked": mem_unchunked["logits"] / GIB,
            "total": mem["total"] / GIB,
            "total_without_checkpointing": mem_no_ckpt["total"] / GIB,
        },
        "instruct_effective_batch": recipe.instruct.effective_batch,
        "init_std": {
            "embedding_and_in_proj": model.model_dim**-0.5,
            "out_proj": model.model_dim**-0.5 * (2 * model.num_layers) ** -0.5,
        },
    }
    if plan is not None:
        out["plan"] = plan
    return out


def _params_dict(p: ParamCount) -> dict[str, int]:
    return {
        "vocab_size": p.vocab_size,
        "total": p.total,
        "attention": p.attention,
        "ffn": p.ffn,
        "embedding": p.embedding,
        "norms": p.norms,
    }


def human(n: float, unit: str = "") -> str:
    """1_079_891_456 -> '1.08B'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:g}{unit}"

