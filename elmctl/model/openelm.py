"""OpenELM decoder in PyTorch, numerically matching Apple's CoreNet / HF port (facts §3).

Shape legend
    B  batch              T  query positions (this call)     S  key positions (cache + this call)
    D  model_dim          E  head_dim                        H  query heads of a layer
    K  kv heads of a layer (H / num_gqa_groups)              F  ffn width of a layer
    V  embedding rows (cfg.padded_vocab_size)

Module names mirror Apple's so ``state_dict()`` keys equal the HF safetensors keys minus the
``transformer.`` prefix (token_embeddings, layers.{i}.attn_norm, attn.qkv_proj, attn.q_norm, attn.k_norm,
attn.out_proj, ffn_norm, ffn.proj_1, ffn.proj_2, norm). The RoPE tables live in one shared,
non-persistent ``rope`` module (Apple keeps a copy per layer; the values are identical).

Written for torch.compile: no data-dependent Python branches on the training path, native GQA in
SDPA (``enable_gqa=True``: kv head j serves query heads j*G .. j*G+G-1, the repeat_interleave grouping
Apple uses), one cos/sin lookup per forward.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from elmctl.config.derived import LayerShape, layer_shapes

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.config.schema import ModelConfig

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rope", "Attention", "FeedForward", "Block", "KVCache", "OpenELM"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, then times the weight (Apple's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Under bf16 autocast with fp32 weights the product is fp32, exactly as in Apple's code.
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables [L, E] (fp32) for rotate-half (GPT-NeoX) RoPE, L = max(rope_max_length, seq)."""

    def __init__(self, head_dim: int, base: float, max_len: int):
        super().__init__()
        self.head_dim, self.base, self.max_len = head_dim, float(base), max_len
        cos, sin = self._tables(max_len, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, length: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Same recipe as CoreNet rotary_embeddings.py: inv_freq = base^(-(0,2,..,E-2)/E), all fp32.
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        pos = torch.arange(length, dtype=torch.float32, device=device)
        theta = torch.outer(pos, inv_freq)  # [L, E/2]
        emb = torch.cat((theta, theta), dim=-1)  # [L, E]
        return emb.cos(), emb.sin()

    def reset_cache(self) -> None:
        """Recompute the tables in fp32 on the buffers' device (after loading onto a meta-built model)."""
        device = self.cos.device
        if device.type != "meta":
            self.cos, self.sin = self._tables(self.max_len, device)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `.to(bfloat16)` on the model must not round the tables: rebuild them in fp32.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            if self.cos.device.type == "meta":
                self.cos, self.sin = self.cos.float(), self.sin.float()
            else:
                self.reset_cache()
        return self

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, E] for positions start .. start+length-1."""
        end = start + length
        if end <= self.cos.shape[0]:
            return self.cos[start:end], self.sin[start:end]
        cos, sin = self._tables(end, self.cos.device)  # longer than the cache: compute, do not store
        return cos[start:], sin[start:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, H, T, E], cos/sin [T, E] (fp32); computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class KVCache:
    """Pre-allocated keys (after k_norm and RoPE, at their absolute positions) and values per layer.

    Storing rotated keys is equivalent to Apple's cache of un-rotated keys that are re-rotated each
    step: the rotation of a key at a fixed position is the same computation either way.
    """

    def __init__(self, model: "OpenELM", batch: int, max_len: int, *, device=None, dtype=None):
        p = model.token_embeddings.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        E = model.config.head_dim
        self.max_len = max_len
        self.length = 0  # positions already stored
        self.k = [torch.zeros(batch, s.kv_heads, max_len, E, device=device, dtype=dtype) for s in model.shapes]
        self.v = [torch.zeros_like(k) for k in self.k]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, K, T, E] after the current length; return all keys/values [B, K, S, E]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm before RoPE; no biases."""

    def __init__(self, cfg: "ModelConfig", shape: LayerShape):
        super().__init__()
        self.layer_index = shape.index
        self.num_q_heads, self.num_kv_heads, self.head_dim = shape.query_heads, shape.kv_heads, cfg.head_dim
        E = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.model_dim, (shape.query_heads + 2 * shape.kv_heads) * E, bias=False)
        if cfg.normalize_qk_projections:
            self.q_norm: nn.Module = RMSNorm(E, cfg.norm_eps)  # one weight [E] shared by all heads
            self.k_norm: nn.Module = RMSNorm(E, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.out_proj = nn.Linear(shape.query_heads * E, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, E = self.num_q_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, E).transpose(1, 2)  # [B, H+2K, T, E]
        q, k, v = qkv.split((H, K, K), dim=1)  # [B,H,T,E], [B,K,T,E], [B,K,T,E]
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            start = cache.length
            k, v = cache.update(self.layer_index, k, v)  # [B, K, S, E], in the cache's dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1:  # one new query sees every cached key
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:  # bottom-right aligned causal mask: query t sits at position start + t
                S = k.shape[2]
                mask = torch.arange(S, device=x.device)[None, :] <= (torch.arange(T, device=x.device)[:, None] + start)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, H * E)  # [B, T, H*E]
        return self.out_proj(out)


class FeedForward(nn.Module):
    """Fused SwiGLU: proj_1 -> [gate | up] (F each), silu(gate) * up, proj_2."""

    def __init__(self, cfg: "ModelConfig", shape: LayerShape):
        super().__init__()
        self.proj_1 = nn.Linear(cfg.model_dim, 2 * shape.ffn_dim, bias=False)
        self.proj_2 = nn.Linear(shape.ffn_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        gate, up = self.proj_1(x).chunk(2, dim=-1)  # [B, T, F] each
        return self.proj_2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer layer: h = x + attn(norm(x)); y = h + ffn(norm(h))."""

    def __init__(self, cfg: "ModelConfig", shape: LayerShape):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.attn = Attention(cfg, shape)
        self.ffn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg, shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELM(nn.Module):
    """The OpenELM decoder for one :class:`~elmctl.config.schema.ModelConfig`.

    Args:
        cfg: the architecture; the embedding has ``cfg.padded_vocab_size`` rows.
        activation_checkpointing: recompute each block in backward (non-reentrant); switchable later
            through the attribute of the same name.
    """

    def __init__(self, cfg: "ModelConfig", *, activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing
        self.shapes = layer_shapes(cfg)
        self.token_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.model_dim)
        self.layers = nn.ModuleList(Block(cfg, s) for s in self.shapes)
        self.norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        if not cfg.share_input_output_layers:
            self.lm_head = nn.Linear(cfg.model_dim, cfg.padded_vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_freq_constant, max(cfg.rope_max_length, cfg.context_length))
        self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection [V, D]: the embedding itself when tied."""
        return self.token_embeddings.weight if self.config.share_input_output_layers else self.lm_head.weight

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Apple's init (CoreNet ``general_gpt.reset_parameters``, facts §3).

        Linear ~ N(0, in_features^-1/2); embedding ~ N(0, D^-1/2) (pad row included); norms = 1;
        then out_proj and proj_2 are re-drawn from N(0, D^-1/2 (2N)^-1/2).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, module.in_features**-0.5, generator=generator)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, module.embedding_dim**-0.5, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        std = self.config.model_dim**-0.5 * (2 * self.config.num_layers) ** -0.5
        for name, param in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("ffn.proj_2.weight"):
                nn.init.normal_(param, 0.0, std, generator=generator)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] for input_ids [B, T] (for chunked losses)."""
        T = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        cos, sin = self.rope(start, T)  # [T, E] fp32
        h = self.token_embeddings(input_ids)  # [B, T, D]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] (tied head: h @ embedding^T, no scaling)."""
        return F.linear(self.hidden_states(input_ids, cache), self.output_weight)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(recipe_or_path, *, activation_checkpointing: bool | None = None, device=None, dtype=None,
                **overrides) -> OpenELM:
    """Build a freshly initialised OpenELM from a recipe id/path, a Recipe, or a ModelConfig.

    ``overrides`` are ModelConfig fields (e.g. ``num_layers=2``), validated by pydantic;
    activation checkpointing defaults to the recipe's ``pretrain.activation_checkpointing``.
    Raises UsageError for unknown recipes or invalid fields.
    """
    from pydantic import ValidationError

    from elmctl.config import load_recipe
    from elmctl.config.schema import ModelConfig
    from elmctl.errors import UsageError

    if isinstance(recipe_or_path, ModelConfig):
        cfg, ckpt_default = recipe_or_path, False
    else:
        recipe = load_recipe(recipe_or_path)
        cfg, ckpt_default = recipe.model, recipe.pretrain.activation_checkpointing
    if overrides:
        try:
            cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
            raise UsageError(f"invalid model override: {problems}", "overrides are ModelConfig fields") from None
    ckpt = ckpt_default if activation_checkpointing is None else activation_checkpointing
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = OpenELM(cfg, activation_checkpointing=ckpt)
    return model.to(dtype) if dtype is not None else model

