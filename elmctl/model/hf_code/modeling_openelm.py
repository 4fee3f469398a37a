# OpenELM for Hugging Face transformers (trust_remote_code).
# Part of elmctl, Apache-2.0. Written against transformers' public API (PreTrainedModel, GenerationMixin,
# the Cache classes); numerically the same network as elmctl/model/openelm.py and Apple's release.
"""OpenELM decoder for ``AutoModelForCausalLM`` (checkpoint names of Apple's ``apple/OpenELM-*``).

Shape legend
    B  batch              T  query positions (this call)     S  key positions (cache + this call)
    D  model_dim          E  head_dim                        H  query heads of a layer
    K  kv heads of a layer                                   F  ffn width of a layer
    V  vocab_size

Module tree (= safetensors keys): ``transformer.token_embeddings``, ``transformer.layers.{i}.{attn_norm,
attn.qkv_proj, attn.q_norm, attn.k_norm, attn.out_proj, ffn_norm, ffn.proj_1, ffn.proj_2}``,
``transformer.norm``; ``lm_head`` only when the output layer is not tied to the embedding.

Per layer (pre-norm, no biases, no dropout): h = x + out_proj(attn(attn_norm(x))); y = h +
proj_2(silu(gate) * up) with [gate | up] = proj_1(ffn_norm(h)). Attention: qkv_proj rows are H query,
K key, K value heads of width E; q and k go through RMSNorm over E (one weight shared by all heads), then
rotate-half RoPE (fp32); kv head j serves query heads j*G .. j*G+G-1 (G = H / K); causal SDPA.

Differences from Apple's port, all deliberate: the KV cache is a transformers ``Cache`` (``DynamicCache``)
holding keys after RoPE (the same numbers as re-rotating cached keys each step); ``position_ids`` and a
padding ``attention_mask`` are honoured (left-padded batches generate correctly); logits cover the
vocabulary (Apple's ``logits[:, :vocab_size]`` slices the sequence dimension, a no-op below 32001 tokens).

Supports transformers >= 4.46: the 4.x (``past_key_values=``) and 5.x (``cache=``) calling conventions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import __version__ as _transformers_version
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_openelm import OpenELMConfig

__all__ = ["OpenELMModel", "OpenELMForCausalLM", "OpenELMPreTrainedModel"]

# Older versions need a model-specific prepare_inputs_for_generation; fail at import with the fix, not in generate().
if tuple(int(p) for p in _transformers_version.split(".")[:2]) < (4, 46):
    raise ImportError(f"OpenELM's modelling code needs transformers >= 4.46, found {_transformers_version}: "
                      "pip install -U transformers")
# transformers 5 names the cache field of model outputs `cache`; 4.x names it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
# SDPA groups kv heads itself since torch 2.5 (the grouping above); older torch gets repeat_interleave.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class OpenELMRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, then times the weight (in that order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, E] (fp32) for integer positions [B, T] (rotate-half layout: angles repeated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    theta = positions.float()[..., None] * inv_freq  # [B, T, E/2]
    emb = torch.cat((theta, theta), dim=-1)[:, None]  # [B, 1, T, E]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, E], computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class OpenELMAttention(nn.Module):
    """Grouped-query attention of one layer, with per-head q/k RMSNorm before RoPE."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_q_heads = config.num_query_heads[layer_idx]
        self.num_kv_heads = config.num_kv_heads[layer_idx]
        self.head_dim = E = config.head_dim
        self.qkv_proj = nn.Linear(config.model_dim, (self.num_q_heads + 2 * self.num_kv_heads) * E, bias=False)
        if config.normalize_qk_projections:
            self.q_norm: nn.Module = OpenELMRMSNorm(E, config.rms_norm_eps)
            self.k_norm: nn.Module = OpenELMRMSNorm(E, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.out_proj = nn.Linear(self.num_q_heads * E, config.model_dim, bias=False)
        self.out_proj.openelm_residual = True  # initialised smaller (see _init_weights)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D]; mask: None (plain causal) or bool [B, 1, T, S] (True = attend)."""
        B, T, _ = x.shape
        H, K, E = self.num_q_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, E).transpose(1, 2)  # [B, H+2K, T, E]
        q, k, v = qkv.split((H, K, K), dim=1)  # [B,H,T,E], [B,K,T,E], [B,K,T,E]
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, K, S, E]
        S = k.shape[2]
        if mask is None and T > 1 and cache is not None:  # query t sits at position S - T + t (bottom-right causal)
            mask = torch.arange(S, device=x.device)[None, :] <= torch.arange(T, device=x.device)[:, None] + (S - T)
        gqa: dict[str, Any] = {}
        if H != K:
            if _SDPA_GQA:
                gqa["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # [B, H, S, E]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        else:  # a whole sequence (causal) or one new query (sees every key)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **gqa)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * E))  # [B, T, H*E] -> [B, T, D]


class OpenELMFeedForward(nn.Module):
    """Fused SwiGLU: proj_1 -> [gate | up] (F each), silu(gate) * up, proj_2."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        ffn_dim = config.ffn_dim(layer_idx)
        self.proj_1 = nn.Linear(config.model_dim, 2 * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, config.model_dim, bias=False)
        self.proj_2.openelm_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        gate, up = self.proj_1(x).chunk(2, dim=-1)  # [B, T, F] each
        return self.proj_2(F.silu(gate) * up)


class OpenELMDecoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.attn = OpenELMAttention(config, layer_idx)
        self.ffn_norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.ffn = OpenELMFeedForward(config, layer_idx)

    def forward(self, x, cos, sin, cache=None, mask=None):  # [B, T, D] -> [B, T, D]
        h = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMPreTrainedModel(PreTrainedModel):
    """Weight init (Apple's CoreNet scheme) and the flags transformers reads."""

    config_class = OpenELMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["OpenELMDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: generate() hands us a DynamicCache
    _supports_static_cache = False

    def _init_weights(self, module: nn.Module) -> None:
        """Linear ~ N(0, in_features^-1/2); embedding ~ N(0, D^-1/2); norms 1; out_proj and proj_2 ~
        N(0, D^-1/2 (2N)^-1/2). Only used for weights a checkpoint does not provide."""
        D, N = self.config.model_dim, self.config.num_transformer_layers
        if isinstance(module, nn.Linear):
            residual = getattr(module, "openelm_residual", False)
            std = D**-0.5 * (2 * N) ** -0.5 if residual else module.in_features**-0.5
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, D**-0.5)
        elif isinstance(module, OpenELMRMSNorm):
            nn.init.ones_(module.weight)


def _attention_mask(attention_mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor | None:
    """None when every key is real (plain causal attention); else bool [B, 1, T, S], True = attend."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:  # a prepared mask: bool (True = attend) or additive float (0 = attend)
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    keys = attention_mask[:, -S:].bool()  # [B, S]
    if bool(keys.all()):
        return None
    causal = torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)  # [T, S]
    mask = causal[None, None] & keys[:, None, None, :]  # [B, 1, T, S]
    # A padding query sees no key; let it see all so SDPA returns numbers, not NaN (its output is unused).
    return mask | ~mask.any(dim=-1, keepdim=True)


class OpenELMModel(OpenELMPreTrainedModel):
    """Embedding, decoder layers and the final norm; returns the normed hidden states."""

    def __init__(self, config: OpenELMConfig):
        super().__init__(config)
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(OpenELMDecoderLayer(config, i) for i in range(config.num_transformer_layers))
        self.norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_embeddings = value

    def _new_cache(self) -> Cache:
        try:
            return DynamicCache(config=self.config)  # transformers >= 4.56
        except TypeError:
            return DynamicCache()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OpenELM: pass exactly one of input_ids and inputs_embeds")
        h = self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T, _ = h.shape
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if isinstance(cache, (tuple, list)):  # the legacy tuple format of old transformers
            cache = DynamicCache.from_legacy_cache(cache)
        if use_cache and cache is None:
            cache = self._new_cache()
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # left padding
            else:
                position_ids = torch.arange(past, S, device=h.device)[None].expand(B, T)
        position_ids = position_ids.to(h.device).expand(B, T)
        cos, sin = rope_tables(position_ids, self.config.head_dim, float(self.config.rope_freq_constant))
        mask = _attention_mask(attention_mask, T, S, h.device)

        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(h)
            h = layer(h, cos, sin, cache, mask)
        h = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(h)
        out = BaseModelOutputWithPast(last_hidden_state=h, hidden_states=tuple(all_hidden) if all_hidden else None,
                                      **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class OpenELMForCausalLM(OpenELMPreTrainedModel, GenerationMixin):
    """OpenELM with its language-model head (tied to the embedding unless share_input_output_layers is off)."""

    def __init__(self, config: OpenELMConfig):
        super().__init__(config)
        self.transformer = OpenELMModel(config)
        self.lm_head = None if config.share_input_output_layers else \
            nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.token_embeddings = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head  # None when tied: the logits use the embedding matrix directly

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, V] (or the last ``logits_to_keep`` positions); with ``labels`` [B, T], the mean
        next-token cross-entropy over labels != -100 (labels are shifted here, as in transformers)."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states, return_dict=True,
                               cache=cache if cache is not None else past_key_values)
        h = out.last_hidden_state  # [B, T, D]
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        weight = self.transformer.token_embeddings.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)  # [B, T, V]: no scaling, no softcap
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(T-1), V]
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_CACHE_FIELD: out[_CACHE_FIELD] if _CACHE_FIELD in out else None})
        return result if return_dict is not False else result.to_tuple()
