"""`pretrain.attention_backend`: the SDPA preference reaches the model call, same numbers either way."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from elmctl.config import load_recipe
from elmctl.errors import UsageError
from elmctl.model.openelm import build_model
from elmctl.train import dist as D


def _attention_ops(backend: str) -> tuple[torch.Tensor, set[str]]:
    torch.manual_seed(0)
    runner = D.wrap_model(build_model("tiny"), device=torch.device("cpu"), attention_backend=backend)
    ids = torch.randint(0, 259, (2, 32))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            out = runner.handle.hidden_states(ids)
    return out, {e.key for e in prof.key_averages() if "attention" in e.key or "bmm" in e.key}


def test_math_preference_reaches_the_model_and_changes_only_the_kernel():
    auto_out, auto_ops = _attention_ops("auto")
    math_out, math_ops = _attention_ops("math")
    fused = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert fused in auto_ops and fused not in math_ops  # the preference took effect
    assert "aten::bmm" in math_ops or "aten::_scaled_dot_product_attention_math" in math_ops
    torch.testing.assert_close(math_out, auto_out, rtol=1e-5, atol=1e-5)


def test_cudnn_preference_falls_back_where_cudnn_cannot_run():
    # No cuDNN attention on the CPU: the next backend in the order serves, bit for bit the default.
    auto_out, _ = _attention_ops("auto")
    cudnn_out, ops = _attention_ops("cudnn")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert torch.equal(cudnn_out, auto_out)


def test_the_preference_is_scoped_to_the_model_call():
    from torch.backends.cuda import math_sdp_enabled, flash_sdp_enabled

    before = (flash_sdp_enabled(), math_sdp_enabled())
    _attention_ops("math")
    assert (flash_sdp_enabled(), math_sdp_enabled()) == before


def test_recipe_field_default_and_bad_value():
    assert load_recipe("270m").pretrain.attention_backend == "auto"
    assert load_recipe("tiny", ["pretrain.attention_backend=cudnn"]).pretrain.attention_backend == "cudnn"
    with pytest.raises(UsageError, match="attention_backend"):
        load_recipe("tiny", ["pretrain.attention_backend=fast"])
    with pytest.raises(ValueError, match="unknown attention backend"):
        D.sdpa_preference("fast")
