# OpenELM configuration for Hugging Face transformers (trust_remote_code).
# Part of elmctl, Apache-2.0. Written against transformers' public API; reads the config.json keys of
# Apple's released apple/OpenELM-* folders as well as the folders `elmctl export` writes.
"""OpenELM configuration: Apple's config.json keys, with layer-wise scaling resolved per layer.

OpenELM gives every layer its own width (Mehta et al. 2024, "layer-wise scaling"). For N layers:

- alpha_i = round(linspace(qkv_min, qkv_max, N)[i], 2); query heads_i = make_divisible(model_dim *
  alpha_i, head_dim * num_gqa_groups) / head_dim; kv heads_i = query heads_i / num_gqa_groups
  (``num_gqa_groups`` query heads share one kv head).
- beta_i = round(linspace(ffn_min, ffn_max, N)[i], 2); ffn width_i = make_divisible(beta_i * model_dim,
  ffn_dim_divisor).

The 2-decimal rounding matters (it changes widths of the 270M, 1.1B and 3B models). A config.json may
state the per-layer results directly (``num_query_heads``, ``num_kv_heads`` and an N-long
``ffn_multipliers``, as Apple's released files do); stated lists win over the multipliers, since they
describe the weights. After construction the config always holds the per-layer lists.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PretrainedConfig

__all__ = ["OpenELMConfig", "make_divisible"]


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Nearest multiple of ``divisor`` (at least ``min_value``, default divisor), never below 0.9 * value."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # rounding down must not lose more than 10%
        new_value += divisor
    return int(new_value)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace(start, stop, num), both endpoints included, value for value."""
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [float(stop)]


def _round2(x: float) -> float:
    """numpy.round(x, 2): half to even on x * 100 (Python's round does the same)."""
    return round(x * 100) / 100


def _per_layer(value: Any, num_layers: int, name: str) -> list[float]:
    """A multiplier given as a number, [min, max] or N per-layer values -> N per-layer values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * num_layers
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        if len(value) == num_layers:  # already per layer (Apple's released ffn_multipliers)
            return [float(v) for v in value]
        if len(value) == 2:  # (min, max), interpolated over depth and rounded to 2 decimals
            return [_round2(v) for v in _linspace(float(value[0]), float(value[1]), num_layers)]
    raise ValueError(f"OpenELMConfig: {name} must be a number, [min, max] or {num_layers} per-layer values, "
                     f"got {value!r}")


def _int_list(value: Any, num_layers: int, name: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != num_layers or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"OpenELMConfig: {name} must list {num_layers} positive integers (one per layer), "
                         f"got {value!r}")
    return list(value)


class OpenELMConfig(PretrainedConfig):
    """Configuration of an OpenELM decoder (defaults: OpenELM-270M with the LLaMA-2 vocabulary).

    Args:
        vocab_size: rows of the token embedding (and of the output layer).
        max_context_length: the context the model was trained for.
        num_transformer_layers: N, the number of decoder layers.
        model_dim: width of the residual stream.
        head_dim: width of one attention head.
        qkv_multipliers: attention width multipliers: a number, [min, max], or N values.
        num_query_heads / num_kv_heads: per-layer head counts; derived from ``qkv_multipliers`` when None.
        num_gqa_groups: query heads per kv head.
        ffn_multipliers: FFN width multipliers: a number, [min, max], or N values.
        ffn_dim_divisor: FFN widths are multiples of this.
        ffn_with_glu / activation_fn_name: only the SwiGLU FFN (True, "swish"/"silu") is supported.
        normalization_layer_name: only "rms_norm" is supported.
        normalize_qk_projections: per-head RMSNorm on queries and keys (before RoPE).
        share_input_output_layers: the output layer is the token embedding (tied).
        rope_freq_constant: RoPE base.
        rope_max_length: positions of Apple's precomputed RoPE table (kept for compatibility; positions
            beyond it work the same, the tables are computed on the fly).
        rms_norm_eps: RMSNorm epsilon (Apple's files fix it at 1e-6 and do not state it).
        initializer_range: unused by the OpenELM init (kept because Apple's files state it).
        bos_token_id / eos_token_id / pad_token_id: special token ids.
    """

    model_type = "openelm"
    # Names generic transformers code (caches, pipelines, tools) reads.
    attribute_map = {
        "num_hidden_layers": "num_transformer_layers",
        "hidden_size": "model_dim",
        "max_position_embeddings": "max_context_length",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        max_context_length: int = 2048,
        num_transformer_layers: int = 16,
        model_dim: int = 1280,
        head_dim: int = 64,
        qkv_multipliers: float | Sequence[float] = (0.5, 1.0),
        num_query_heads: Sequence[int] | None = None,
        num_kv_heads: Sequence[int] | None = None,
        num_gqa_groups: int = 4,
        ffn_multipliers: float | Sequence[float] = (0.5, 4.0),
        ffn_with_glu: bool = True,
        ffn_dim_divisor: int = 256,
        activation_fn_name: str = "swish",
        normalization_layer_name: str = "rms_norm",
        normalize_qk_projections: bool = True,
        share_input_output_layers: bool = True,
        rope_freq_constant: float = 10000,
        rope_max_length: int = 4096,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs: Any,
    ):
        if ffn_with_glu is not True or activation_fn_name not in ("swish", "silu"):
            raise ValueError("OpenELMConfig: only the SwiGLU FFN is supported (ffn_with_glu true, "
                             f"activation_fn_name 'swish'), got {ffn_with_glu!r}, {activation_fn_name!r}")
        if normalization_layer_name != "rms_norm":
            raise ValueError(f"OpenELMConfig: only rms_norm is supported, got {normalization_layer_name!r}")
        n = int(num_transformer_layers)
        if n < 1 or model_dim < 1 or head_dim < 1 or num_gqa_groups < 1 or ffn_dim_divisor < 1:
            raise ValueError("OpenELMConfig: num_transformer_layers, model_dim, head_dim, num_gqa_groups and "
                             "ffn_dim_divisor must be positive")
        if head_dim % 2:
            raise ValueError(f"OpenELMConfig: head_dim must be even for RoPE, got {head_dim}")

        if num_query_heads is None:
            alphas = _per_layer(list(qkv_multipliers) if isinstance(qkv_multipliers, tuple) else qkv_multipliers,
                                n, "qkv_multipliers")
            q_dims = [make_divisible(model_dim * a, head_dim * num_gqa_groups) for a in alphas]
            num_query_heads = [q // head_dim for q in q_dims]
        num_query_heads = _int_list(num_query_heads, n, "num_query_heads")
        if num_kv_heads is None:
            num_kv_heads = [q // num_gqa_groups for q in num_query_heads]
        num_kv_heads = _int_list(num_kv_heads, n, "num_kv_heads")
        for i, (q, kv) in enumerate(zip(num_query_heads, num_kv_heads)):
            if q % kv:
                raise ValueError(f"OpenELMConfig: layer {i} has {q} query heads, not a multiple of its {kv} kv heads")

        self.vocab_size = vocab_size
        self.max_context_length = max_context_length
        self.num_transformer_layers = n
        self.model_dim = model_dim
        self.head_dim = head_dim
        self.qkv_multipliers = list(qkv_multipliers) if isinstance(qkv_multipliers, tuple) else qkv_multipliers
        self.num_query_heads = num_query_heads
        self.num_kv_heads = num_kv_heads
        self.num_gqa_groups = num_gqa_groups
        self.ffn_multipliers = _per_layer(
            list(ffn_multipliers) if isinstance(ffn_multipliers, tuple) else ffn_multipliers, n, "ffn_multipliers")
        self.ffn_with_glu = ffn_with_glu
        self.ffn_dim_divisor = ffn_dim_divisor
        self.activation_fn_name = activation_fn_name
        self.normalization_layer_name = normalization_layer_name
        self.normalize_qk_projections = normalize_qk_projections
        self.share_input_output_layers = share_input_output_layers
        self.rope_freq_constant = rope_freq_constant
        self.rope_max_length = rope_max_length
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", share_input_output_layers)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def ffn_dim(self, layer: int) -> int:
        """FFN width of ``layer`` (the SwiGLU's gate and up halves each have this width)."""
        return make_divisible(self.ffn_multipliers[layer] * self.model_dim, self.ffn_dim_divisor)
