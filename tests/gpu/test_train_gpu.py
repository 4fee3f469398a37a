"""GPU checks (opt-in: pytest -m gpu): bf16 compiled training steps of 270M, and the DDP path."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _steps(recipe_id: str, *, micro: int, seq: int, n: int, compile_model: bool, ddp: bool):
    from elmctl.config import load_recipe
    from elmctl.model import OpenELM
    from elmctl.train import dist as D
    from elmctl.train.loop import make_train_step
    from elmctl.train.objectives import lm_objective
    from elmctl.train.optim import build_adamw

    recipe = load_recipe(recipe_id, [f"model.context_length={seq}"])
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = OpenELM(recipe.model)
    runner = D.wrap_model(model, device=device, compile_model=compile_model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[0], broadcast_buffers=False, gradient_as_bucket_view=True)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    assert opt.defaults.get("fused")
    step = make_train_step(runner, opt, lm_objective(), grad_accumulation=2, grad_clip=1.0, precision="bf16",
                           device=device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, recipe.model.vocab_size, (micro, seq + 1), generator=g).to(device)  # one batch, memorised
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    return [step([batch, batch], 1e-3)["loss"].item() for _ in range(n)]


@needs_cuda
def test_270m_bf16_compiled_loss_decreases():
    losses = _steps("270m", micro=2, seq=512, n=8, compile_model=True, ddp=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@needs_cuda
def test_ddp_single_gpu_path(tmp_path):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from elmctl.launch.torchrun import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1, init_method="env://")
    try:
        losses = _steps("tiny", micro=4, seq=128, n=10, compile_model=True, ddp=True)
    finally:
        dist.destroy_process_group()
    assert losses[-1] < losses[0], losses


@needs_cuda
def test_chunked_loss_compiled_bf16_matches_full_logits():
    """The compiled chunk (bf16 GEMMs, fused gradient) against autograd through full fp32 logits."""
    import torch.nn.functional as F

    from elmctl.train.objectives import chunked_lm_loss, naive_lm_loss

    torch.manual_seed(0)
    N, D, V = 8192, 1280, 32128
    h0 = torch.randn(N, D, device="cuda") * 0.5
    w0 = torch.randn(V, D, device="cuda") * D**-0.5
    y = torch.randint(0, 32000, (N,), device="cuda")
    y[::5] = -100
    out = {}
    for name in ("chunked", "naive"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "chunked":
                loss = chunked_lm_loss(h, w, y, chunk_tokens=4096)[0]
            else:
                loss = sum(naive_lm_loss(F.linear(h, w).float(), y))
        loss.backward()
        out[name] = (loss.item(), h.grad, w.grad)
    (lc, hc, wc), (ln, hn, wn) = out["chunked"], out["naive"]
    assert abs(lc - ln) < 1e-3 * abs(ln)
    cos = torch.nn.functional.cosine_similarity
    assert cos(hc.flatten().double(), hn.flatten().double(), dim=0) > 0.999
    assert cos(wc.flatten().double(), wn.flatten().double(), dim=0) > 0.999
    assert wc.dtype == torch.float32
