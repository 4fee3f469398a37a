"""OpenELM in PyTorch: shapes, parameter counts, init, building blocks vs reference maths, generation."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import elmctl
from elmctl.config import load_recipe
from elmctl.config.derived import param_count
from elmctl.errors import UsageError
from elmctl.model import KVCache, OpenELM, generate
from elmctl.model.openelm import RMSNorm, RotaryEmbedding, apply_rope

# Apple's released OpenELM-270M config.json (facts §7).
APPLE_270M_Q = [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20]
APPLE_270M_KV = [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5]
APPLE_270M_FFN_MULT = [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0]


def _make_divisible(v: float, divisor: int) -> int:  # CoreNet math_utils, restated for the test
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


@pytest.fixture(scope="module")
def tiny() -> OpenELM:
    torch.manual_seed(0)
    return elmctl.build_model("tiny")


@pytest.fixture(scope="module")
def m270() -> OpenELM:
    torch.manual_seed(0)
    return elmctl.build_model("270m")


def test_import_elmctl_is_lazy():
    import subprocess

    code = "import sys, elmctl; assert 'torch' not in sys.modules; elmctl.build_model; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_param_count_tiny_and_270m(tiny, m270):
    for model in (tiny, m270):
        cfg = model.config
        assert model.num_parameters() == param_count(cfg, cfg.padded_vocab_size).total
    assert m270.num_parameters() == 271_691_008  # facts §4, CoreNet 32128 rows


@pytest.mark.parametrize("rid, hf_count", [("1_1b", 1_079_891_456), ("3b", 3_036_647_424)])
def test_param_count_large_on_meta(rid, hf_count):
    model = elmctl.build_model(rid, device="meta")
    cfg = model.config
    assert model.num_parameters() == param_count(cfg, cfg.padded_vocab_size).total
    assert model.num_parameters() - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.model_dim == hf_count


def test_270m_layer_shapes_match_apple_config(m270):
    d, E = 1280, 64
    for i, layer in enumerate(m270.layers):
        q, kv = APPLE_270M_Q[i], APPLE_270M_KV[i]
        ffn = _make_divisible(APPLE_270M_FFN_MULT[i] * d, 256)
        assert layer.attn.qkv_proj.weight.shape == ((q + 2 * kv) * E, d)
        assert layer.attn.out_proj.weight.shape == (d, q * E)
        assert layer.ffn.proj_1.weight.shape == (2 * ffn, d)
        assert layer.ffn.proj_2.weight.shape == (d, ffn)
        assert layer.attn.q_norm.weight.shape == layer.attn.k_norm.weight.shape == (E,)
    assert m270.token_embeddings.weight.shape == (32128, d)


def test_state_dict_keys_are_apple_names(tiny):
    keys = set(tiny.state_dict())
    layer0 = {f"layers.0.{n}.weight" for n in
              ("attn_norm", "attn.qkv_proj", "attn.q_norm", "attn.k_norm", "attn.out_proj", "ffn_norm", "ffn.proj_1", "ffn.proj_2")}
    assert layer0 <= keys
    assert {"token_embeddings.weight", "norm.weight"} <= keys
    assert len(keys) == 2 + 8 * tiny.config.num_layers  # no lm_head, no rotary buffers
    assert tiny.output_weight is tiny.token_embeddings.weight


def test_init_std_matches_apple_270m(m270):
    d, n = 1280, 16
    small = d**-0.5 * (2 * n) ** -0.5
    assert math.isclose(d**-0.5, 0.02795, rel_tol=1e-3) and math.isclose(small, 0.004941, rel_tol=1e-3)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(m270.token_embeddings.weight) == pytest.approx(d**-0.5, rel=0.01)
    for layer in m270.layers[::5]:
        assert std(layer.attn.qkv_proj.weight) == pytest.approx(d**-0.5, rel=0.01)
        assert std(layer.ffn.proj_1.weight) == pytest.approx(d**-0.5, rel=0.01)
        assert std(layer.attn.out_proj.weight) == pytest.approx(small, rel=0.01)
        assert std(layer.ffn.proj_2.weight) == pytest.approx(small, rel=0.01)
        for norm in (layer.attn_norm, layer.ffn_norm, layer.attn.q_norm, layer.attn.k_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert abs(m270.token_embeddings.weight.mean().item()) < 1e-4


def test_rmsnorm_casts_back_before_the_weight():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    x64 = x.double()
    ref = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).double() * norm.weight.double()
    out = norm(x)
    assert out.dtype == torch.float32  # bf16 (normalised) * fp32 weight, as in Apple's code
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_rope_is_rotate_half_with_base_and_offsets():
    E, base = 8, 10000.0
    rope = RotaryEmbedding(E, base, max_len=16)
    x = torch.randn(1, 2, 5, E, dtype=torch.float64)
    cos, sin = rope(3, 5)  # positions 3..7
    out = apply_rope(x.float(), cos, sin).double()
    ref = x.clone()
    for t in range(5):
        for i in range(E // 2):
            ang = (3 + t) * base ** (-2 * i / E)
            a, b = x[..., t, i], x[..., t, i + E // 2]  # NeoX pairs (i, i + E/2), not (2i, 2i+1)
            ref[..., t, i] = a * math.cos(ang) - b * math.sin(ang)
            ref[..., t, i + E // 2] = b * math.cos(ang) + a * math.sin(ang)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    long_cos, long_sin = rope(10, 20)  # beyond the cache: computed on the fly, same values
    full_cos, _ = RotaryEmbedding(E, base, max_len=30)(0, 30)
    torch.testing.assert_close(long_cos, full_cos[10:30])
    assert long_sin.shape == (20, E)


def test_rope_tables_stay_fp32_under_bf16_cast():
    model = elmctl.build_model("tiny", num_layers=1).to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32
    assert model.token_embeddings.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 259, (1, 7)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def _reference_attention(attn, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Straight from facts §3, fp64, explicit repeat_interleave + masked softmax."""
    H, K, E = attn.num_q_heads, attn.num_kv_heads, attn.head_dim
    B, T, _ = x.shape
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    qkv = (x @ W["qkv_proj.weight"].T).view(B, T, H + 2 * K, E).transpose(1, 2)
    q, k, v = qkv[:, :H], qkv[:, H:H + K], qkv[:, H + K:]

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rot(t):
        t1, t2 = t[..., : E // 2], t[..., E // 2:]
        return t * cos.double() + torch.cat((-t2, t1), -1) * sin.double()

    q, k = rot(rms(q, W["q_norm.weight"])), rot(rms(k, W["k_norm.weight"]))
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # kv j -> q heads jG..jG+G-1
    scores = q @ k.transpose(-1, -2) / math.sqrt(E)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * E)
    return out @ W["out_proj.weight"].T


def test_attention_matches_reference_gqa(tiny):
    attn = tiny.layers[1].attn  # 4 query heads, 2 kv heads: grouping matters
    assert (attn.num_q_heads, attn.num_kv_heads) == (4, 2)
    with torch.no_grad():  # non-trivial q/k norm weights so their use is tested
        attn.q_norm.weight.copy_(torch.rand(32) + 0.5)
        attn.k_norm.weight.copy_(torch.rand(32) + 0.5)
    try:
        x = torch.randn(2, 9, 128)
        cos, sin = tiny.rope(0, 9)
        out = attn(x, cos, sin)
        ref = _reference_attention(attn, x.double(), cos, sin)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            attn.q_norm.weight.fill_(1.0)
            attn.k_norm.weight.fill_(1.0)


def test_swiglu_gate_is_first_half(tiny):
    ffn = tiny.layers[2].ffn
    x = torch.randn(2, 3, 128, dtype=torch.float64)
    W1, W2 = ffn.proj_1.weight.detach().double(), ffn.proj_2.weight.detach().double()
    F_ = W2.shape[1]
    gate, up = x @ W1[:F_].T, x @ W1[F_:].T
    ref = (gate * torch.sigmoid(gate) * up) @ W2.T
    torch.testing.assert_close(ffn(x.float()).double(), ref, rtol=1e-4, atol=1e-5)


def test_logits_are_tied_hidden_states(tiny):
    ids = torch.randint(0, 259, (2, 11))
    logits = tiny(ids)
    assert logits.shape == (2, 11, tiny.config.padded_vocab_size)
    torch.testing.assert_close(logits, tiny.hidden_states(ids) @ tiny.token_embeddings.weight.T)


def test_causal(tiny):
    ids = torch.randint(0, 259, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 259
    torch.testing.assert_close(tiny(ids)[:, :8], tiny(ids2)[:, :8])


def test_activation_checkpointing_same_grads():
    torch.manual_seed(1)
    model = elmctl.build_model("tiny", activation_checkpointing=False)
    ids = torch.randint(0, 259, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ckpt", [False, True])
def test_no_graph_breaks(ckpt):
    model = elmctl.build_model("tiny", activation_checkpointing=ckpt)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randint(0, 259, (2, 16)))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_kv_cache_chunked_prefill_matches_full_forward(tiny):
    ids = torch.randint(0, 259, (2, 14))
    full = tiny(ids)
    cache = KVCache(tiny, 2, 20)
    parts = [tiny(ids[:, :5], cache), tiny(ids[:, 5:6], cache), tiny(ids[:, 6:], cache)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def _greedy_full_forward(model, ids, n):
    for _ in range(n):
        nxt = model(ids)[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_generate_matches_full_forward_greedy(tiny):
    ids = torch.randint(3, 259, (3, 6))
    with torch.no_grad():
        ref = _greedy_full_forward(tiny, ids, 12)
    out = generate(tiny, ids, max_new_tokens=12)
    assert torch.equal(out, ref)
    assert torch.equal(generate(tiny, ids[0], 12), ref[0])  # 1-D prompt
    assert tiny.training  # mode restored


def test_generate_eos_and_sampling(tiny):
    ids = torch.randint(3, 259, (2, 4))
    greedy = generate(tiny, ids, 6)
    eos = int(greedy[0, 5])  # the 2nd generated token of row 0 becomes "EOS"
    out = generate(tiny, ids, 6, eos_id=eos)
    assert out[0, 5] == eos and (out[0, 5:] == eos).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(tiny, ids, 8, temperature=1.0, top_k=5, generator=g1)
    s2 = generate(tiny, ids, 8, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (2, 12)
    assert int(s1.max()) < tiny.config.vocab_size  # never samples pad/padding rows
    top1 = generate(tiny, ids, 8, temperature=0.7, top_k=1, generator=g1)
    assert torch.equal(top1, generate(tiny, ids, 8))


def test_build_model_overrides_and_errors():
    model = elmctl.build_model("tiny", num_layers=2, model_dim=64)
    assert len(model.layers) == 2 and model.config.model_dim == 64
    recipe = load_recipe("tiny")
    assert elmctl.build_model(recipe.model).config == recipe.model
    with pytest.raises(UsageError, match="num_layerz"):
        elmctl.build_model("tiny", num_layerz=2)
    with pytest.raises(UsageError, match="head_dim"):
        elmctl.build_model("tiny", head_dim=48)
    with pytest.raises(UsageError):
        elmctl.build_model("no-such-recipe")
