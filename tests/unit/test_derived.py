"""Derived numbers against openelm-facts.md (§3 shapes, §4 parameters, init stds) and perf-anchors.md."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from elmctl.config import load_recipe
from elmctl.config.derived import (
    GIB,
    _round2,
    derive,
    flops_per_token,
    layer_shapes,
    linspace,
    make_divisible,
    memory_estimate,
    param_count,
)
from elmctl.config.plan import batch_plan

# facts §4: (HF vocab 32000, CoreNet 32128, attention, FFN, embedding) and norms (§4 text)
PARAMS = {
    "270m": (271_527_168, 271_691_008, 51.61e6, 178.91e6, 40.96e6, 44_288),
    "450m": (457_179_136, 457_375_744, 89.46e6, 318.50e6, 49.15e6, 65_536),
    "1_1b": (1_079_891_456, 1_080_153_600, 221.51e6, 792.72e6, 65.54e6, 120_320),
    "3b": (3_036_647_424, 3_037_040_640, 644.87e6, 2_293.24e6, 98.30e6, 233_472),
}
# facts §3: query heads (count x layers), ffn range
HEADS = {
    "270m": [(12, 5), (16, 7), (20, 4)],
    "450m": [(12, 3), (16, 7), (20, 6), (24, 4)],
    "1_1b": [(16, 3), (20, 7), (24, 8), (28, 6), (32, 4)],
    "3b": [(12, 4), (16, 14), (20, 12), (24, 6)],
}
FFN_RANGE = {"270m": (768, 5120), "450m": (768, 6144), "1_1b": (1024, 8192), "3b": (1536, 12288)}
# facts §3 init table: d^-1/2 and d^-1/2 (2N)^-1/2
INIT = {"270m": (0.02795, 0.004941), "450m": (0.02552, 0.004034), "1_1b": (0.02210, 0.002953), "3b": (0.01804, 0.002126)}
# perf-anchors.md: training FLOPs per token (6N + 12 n_q d_h T), in G
FLOPS = {"270m": 2.03, "450m": 3.32, "1_1b": 7.54, "3b": 20.3}

# facts §7: Apple's released OpenELM-270M config.json
HF_270M = {
    "num_query_heads": [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
    "num_kv_heads": [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
}


@pytest.mark.parametrize("rid", list(PARAMS))
def test_param_counts_match_facts(rid):
    m = load_recipe(rid).model
    hf_total, cn_total, attn, ffn, emb, norms = PARAMS[rid]
    hf, cn = param_count(m), param_count(m, 32128)
    assert hf.total == hf_total and hf.vocab_size == 32000
    assert cn.total == cn_total
    assert hf.attention == pytest.approx(attn, abs=0.005e6)
    assert hf.ffn == pytest.approx(ffn, abs=0.005e6)
    assert hf.embedding == pytest.approx(emb, abs=0.005e6) and hf.embedding == 32000 * m.model_dim
    assert hf.norms == norms
    assert hf.total == hf.embedding + hf.attention + hf.ffn + hf.norms


@pytest.mark.parametrize("rid", list(HEADS))
def test_layer_shapes_match_facts(rid):
    r = load_recipe(rid)
    shapes = layer_shapes(r.model)
    q = [s.query_heads for s in shapes]
    assert sorted(Counter(q).items()) == HEADS[rid]
    assert q == sorted(q), "query heads grow with depth"
    assert all(s.kv_heads * 4 == s.query_heads for s in shapes)
    ffn = [s.ffn_dim for s in shapes]
    assert (ffn[0], ffn[-1]) == FFN_RANGE[rid]
    assert all(f % 256 == 0 for f in ffn)
    assert [s.index for s in shapes] == list(range(r.model.num_layers))


def test_270m_matches_released_config_json():
    shapes = layer_shapes(load_recipe("270m").model)
    assert [s.query_heads for s in shapes] == HF_270M["num_query_heads"]
    assert [s.kv_heads for s in shapes] == HF_270M["num_kv_heads"]
    assert [s.ffn_multiplier for s in shapes] == HF_270M["ffn_multipliers"]


def test_1_1b_has_ffn_4608_twice_and_3b_head_dim_128():
    ffn = [s.ffn_dim for s in layer_shapes(load_recipe("1_1b").model)]
    assert ffn.count(4608) == 2 and ffn[13] == ffn[14] == 4608
    assert load_recipe("3b").model.head_dim == 128
    assert {load_recipe(r).model.head_dim for r in ("270m", "450m", "1_1b")} == {64}


def test_rounding_matters_where_the_facts_say():
    # facts §3: without the 2-decimal rounding, qkv widths differ at 270M layer 5.
    m = load_recipe("270m").model
    raw = linspace(0.5, 1.0, 16)[5]
    assert make_divisible(m.model_dim * raw, 256) // 64 != layer_shapes(m)[5].query_heads


@pytest.mark.parametrize("rid", list(INIT))
def test_init_stds(rid):
    init = derive(load_recipe(rid))["init_std"]
    assert init["embedding_and_in_proj"] == pytest.approx(INIT[rid][0], abs=5e-6)
    assert init["out_proj"] == pytest.approx(INIT[rid][1], abs=5e-7)


@pytest.mark.parametrize("rid", list(FLOPS))
def test_flops_per_token(rid):
    m = load_recipe(rid).model
    f = flops_per_token(m)
    assert f / 1e9 == pytest.approx(FLOPS[rid], rel=0.003)
    attn = sum(12 * s.query_heads * m.head_dim * m.context_length for s in layer_shapes(m))
    assert f == 6 * param_count(m, m.padded_vocab_size).matmul + attn


@pytest.mark.parametrize("n", list(range(1, 80)) + [128, 256])
def test_linspace_and_round_match_numpy(n):
    for lo, hi in ((0.5, 1.0), (0.5, 4.0), (0.25, 0.75), (1.0, 1.0), (0.1, 8.0)):
        ours = [_round2(x) for x in linspace(lo, hi, n)]
        assert ours == np.round(np.linspace(lo, hi, n), 2).tolist()
        assert linspace(lo, hi, n) == np.linspace(lo, hi, n).tolist()


def _np_make_divisible(v, divisor, min_value=None):
    # CoreNet corenet/utils/math_utils.py, verbatim logic
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def test_make_divisible_matches_reference_and_invariants():
    rng = np.random.default_rng(0)
    for v, div in zip(rng.uniform(0, 20000, 3000), rng.choice([8, 64, 128, 256, 512], 3000)):
        got = make_divisible(float(v), int(div))
        assert got == _np_make_divisible(float(v), int(div))
        assert got % div == 0 and got >= div and got >= 0.9 * v
    assert make_divisible(1, 256) == 256  # floor of one divisor
    assert make_divisible(640, 256) == 768  # 512 < 0.9 * 640, so one more divisor


def test_memory_estimate_follows_perf_anchor_rules():
    m = load_recipe("270m").model
    est = memory_estimate(m, 16)
    assert est["states"] == 16.0 * param_count(m, m.padded_vocab_size).total
    assert est["total"] / GIB < 80  # perf-anchors: 270M at 16 seq/GPU fits without checkpointing
    ckpt = memory_estimate(m, 16, checkpointing=True)
    assert ckpt["activations"] < est["activations"]
    assert memory_estimate(m, 16, chunked_logits=False)["logits"] > est["logits"]
    m11 = load_recipe("1_1b").model
    assert 60 < memory_estimate(m11, 16)["total"] / GIB  # perf-anchors: ~74 GiB without ckpt in CoreNet


@pytest.mark.parametrize("rid,gpus", [("270m", 8), ("450m", 1), ("1_1b", 8), ("3b", 8), ("270m", 128)])
def test_batch_plan_keeps_global_batch(rid, gpus):
    r = load_recipe(rid)
    plan = batch_plan(r, gpus)
    assert plan["micro_batch"] * plan["grad_accumulation"] * gpus == 2048
    assert plan["keeps_global_batch"] and plan["recipe_global_batch_sequences"] == 2048
    assert plan["micro_batch"] <= r.pretrain.sequences_per_gpu


def test_batch_plan_small_gpu_shrinks_micro_batch_or_does_not_fit():
    r = load_recipe("1_1b")
    big, small = batch_plan(r, 8, gpu_mem_gib=80), batch_plan(r, 8, gpu_mem_gib=24)
    assert small["micro_batch"] < big["micro_batch"]
    tiny_gpu = batch_plan(load_recipe("3b"), 1, gpu_mem_gib=8)
    assert tiny_gpu["fits"] is False and tiny_gpu["micro_batch"] == 1


def test_batch_plan_uneven_gpus_is_an_error():
    # #12: 3 GPUs used to get a silent 11 x 62 = 2,046-sequence plan; now the same error as pretrain/tune.
    from elmctl.errors import UsageError

    with pytest.raises(UsageError, match="does not split over 3 processes") as exc:
        batch_plan(load_recipe("270m"), 3)
    assert "1, 2, 4, 8" in exc.value.hint


def test_derive_json_keys():
    r = load_recipe("450m")
    d = derive(r, plan=batch_plan(r, 8))
    assert d["params_total"] == 457_179_136
    assert d["global_batch_sequences"] == 2048 and d["tokens_per_step"] == 4_194_304
    assert d["pretrain_tokens"] == 4_194_304 * 350_000  # ~1.47T
    assert d["instruct_effective_batch"] == 128
    assert len(d["layers"]) == 20 and d["plan"]["gpus"] == 8


def test_memory_estimate_matches_measured_h100_peaks():
    # Every bench result recorded on a GPU (tests/benchmarks/results/*.json): the estimate of a
    # run without activation checkpointing stays within 5% of torch.cuda.max_memory_allocated.
    import json
    from pathlib import Path

    from elmctl.config import load_recipe
    from elmctl.config.derived import GIB, memory_estimate

    checked = 0
    for f in sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*.json")):
        for r in json.loads(f.read_text()).get("results", []):
            if r.get("peak_memory_gib") is None or r["activation_checkpointing"] or r.get("processes", 1) != 1:
                continue
            est = memory_estimate(load_recipe(r["recipe"]).model, r["micro_batch"], r["seq_len"])["total"] / GIB
            assert abs(est - r["peak_memory_gib"]) / r["peak_memory_gib"] < 0.05, (f.name, r["recipe"], est)
            checked += 1
    assert checked >= 2
