"""Kernel categories for `elmctl bench --profile`: real CUDA/inductor kernel names land where they belong."""

from __future__ import annotations

import pytest

from elmctl.train.tools.profile import categorize, summarize


@pytest.mark.parametrize(
    "name, category",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "matmul"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul"),
        ("nvjet_sss_128x64_64x6_2x1_v_bz_NNT", "matmul fp32"),
        ("nvjet_tst_192x192_32x6_2x1_v_bz_coopB_TNT", "matmul fp32"),
        ("ampere_sgemm_128x64_nn", "matmul fp32"),
        ("sm90_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x64x32_cublas", "matmul fp32"),
        ("cutlass_80_simt_sgemm_128x128_8x4_nt_align1", "matmul fp32"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>", "attention"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...cutlass::bfloat16_t...>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "elementwise"),
        ("triton_poi_fused_cat_mul_neg_1", "elementwise"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("Memcpy HtoD (Pageable -> Device)", "memory copy"),
        ("aten::mm", "matmul"),
        ("aten::mul", "elementwise"),
        ("aten::copy_", "memory copy"),
    ],
)
def test_categorize(name, category):
    assert categorize(name) == category


def test_summarize_shares_and_per_step_times():
    timings = [("aten::mm", 600.0), ("aten::mm", 600.0), ("triton_poi_fused_add_0", 300.0), ("ampere_sgemm_64x64", 500.0)]
    s = summarize(timings, steps=2, top=2)
    assert s["device_ms_per_step"] == pytest.approx(1.0)  # 2000 us over 2 steps
    assert s["categories"] == pytest.approx({"matmul": 0.6, "matmul fp32": 0.25, "elementwise": 0.15})
    assert list(s["categories"]) == ["matmul", "matmul fp32", "elementwise"]  # largest first
    assert [r["name"] for r in s["top"]] == ["aten::mm", "ampere_sgemm_64x64"]
    assert s["top"][0]["ms_per_step"] == pytest.approx(0.6)


def test_summarize_empty():
    s = summarize([], steps=3)
    assert s["device_ms_per_step"] == 0 and s["categories"] == {} and s["top"] == []
